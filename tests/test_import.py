"""``import jepa_blocks`` stays light: timm (and torchvision's models behind it) load only on use.

Importing timm imports ``torchvision.models`` and took about 2 s of the 3.8 s that
``import jepa_blocks`` used to take (``import torch`` alone: 1.7 s). The check runs in a
fresh interpreter, where nothing else has imported timm yet.
"""

import subprocess
import sys

HEAVY = ("timm", "torchvision")

SCRIPT = """
import sys
import {module}
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
print(",".join(heavy))
"""


def _loaded_after_import(module: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(module=module, heavy=HEAVY)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    out = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return [m for m in out.split(",") if m]


def test_import_jepa_blocks_does_not_import_timm():
    assert _loaded_after_import("jepa_blocks, jepa_blocks.encoders, jepa_blocks.layers") == []


def test_import_jepa_blocks_adds_nothing_heavy_to_torch():
    """Beyond ``import torch``, only the package itself and einops load (no torch._dynamo,
    which ``torch.compiler.disable`` used as a decorator imports: about 1 s)."""
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import jepa_blocks\n"
        "new = {m.split('.')[0] if not m.startswith('torch.') else m for m in set(sys.modules) - before}\n"
        "new -= {'jepa_blocks', 'einops', 'typing_extensions'}\n"
        "print(','.join(sorted(new, key=lambda m: (not m.startswith('torch'), len(m), m))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    extra = [m for m in proc.stdout.strip().splitlines()[-1].split(",") if m] if proc.stdout.strip() else []
    assert extra == [], f"import jepa_blocks also imports {len(extra)} modules, e.g. {extra[:8]}"


def test_timm_loads_on_use():
    code = (
        "import sys\n"
        "from jepa_blocks.encoders import ViTEncoder\n"
        "assert 'timm' not in sys.modules\n"
        "enc = ViTEncoder.from_timm('vit_tiny_patch16_224', img_size=32, patch_size=4, depth=1)\n"
        "assert 'timm' in sys.modules and enc.embed_dim == 192\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
