"""``import fastcl`` stays cheap: no torch.distributed.tensor, no optional integrations.

torch.distributed.tensor (DTensor) alone costs about a second (sympy and the sharding
rules); ``fastcl.distributed`` imports it only once a DTensor can exist. transformers and
lightning load only with ``fastcl.integrations.hf`` / ``fastcl.integrations.lightning``.
Timing is a benchmark matter; here only *which* modules load is checked, which is exact.
"""
import json
import subprocess
import sys

HEAVY = ("torch.distributed.tensor", "torch.distributed._tensor", "transformers", "lightning", "pytorch_lightning",
         "sympy", "matplotlib", "sklearn", "triton")


def _loaded_after(code: str) -> set[str]:
    probe = f"import sys, json\n{code}\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {set(m.split('.')[0] for m in HEAVY)!r})))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def _heavy(loaded: set[str]) -> list[str]:
    return sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_import_fastcl_loads_no_heavy_module():
    assert _heavy(_loaded_after("import fastcl")) == []


def test_lazy_modules_stay_lazy_until_used():
    # the strategies, the Fisher and the distributed helpers on plain tensors need no DTensor
    code = (
        "import torch, fastcl, fastcl.distributed as d, fastcl.integrations\n"
        "m = torch.nn.Linear(3, 2)\n"
        "e = fastcl.EWC(m, strength=1.0)\n"
        "e.consolidate([(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))], verbose=False)\n"
        "m(torch.randn(2, 3)).sum().backward(); e.add_penalty_grad_()\n"
        "assert not d.is_dtensor(m.weight)\n"
    )
    assert _heavy(_loaded_after(code)) == []


def test_dtensor_attribute_still_resolves():
    loaded = _loaded_after("import fastcl.distributed as d\nassert d.DTensor is None or d.DTensor.__name__ == 'DTensor'")
    assert "torch.distributed.tensor" in loaded  # asked for, so imported
