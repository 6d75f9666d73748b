"""The library needs torch alone; the `vae-ext` command says what to install when its extra is missing.

Each check runs in a subprocess whose ``sitecustomize`` (on PYTHONPATH) makes the command's
dependencies unimportable, as in an environment where only torch is installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vae_ext

PKG_ROOT = Path(vae_ext.__file__).resolve().parents[1]  # where the vae_ext under test is imported from
REPO = Path(__file__).resolve().parents[1]  # the checkout (an installed vae_ext has no pyproject.toml beside it)
BLOCKER = textwrap.dedent("""
    import os, sys

    _BLOCKED = set(filter(None, os.environ.get("VAE_EXT_TEST_BLOCK", "").split(",")))


    class _Block:
        # What a missing module gives: ModuleNotFoundError (which torch's optional imports expect).
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in _BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, _Block())
""")
LIBRARY_ONLY = ["numpy", "tqdm", "matplotlib", "sklearn", "scipy"]


def _run(tmp_path, blocked, *args):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "VAE_EXT_TEST_BLOCK": ",".join(blocked), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(PKG_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)


def test_the_library_needs_torch_alone(tmp_path):
    code = textwrap.dedent("""
        import sys
        import torch
        import vae_ext
        loss_fn = vae_ext.FusedELBOLoss(recon="bce_logits")
        model = vae_ext.VAE(input_shape=(1, 4, 4), latent_size=2, hidden_sizes=[8])
        x = torch.rand(3, 1, 4, 4)
        recon, mu, logvar = model(x)
        loss = loss_fn(recon, x, mu, logvar)
        loss.backward()
        ref = vae_ext.reference.elbo_loss(recon.detach(), x, mu.detach(), logvar.detach(), recon="bce_logits")
        assert torch.isfinite(loss) and torch.allclose(loss, ref.to(loss.dtype), rtol=1e-4), (loss, ref)
        z = vae_ext.reparameterize(mu, logvar)
        cvae = vae_ext.ConvVAE(input_shape=(1, 4, 4), latent_size=2, channels=[2], num_classes=3)
        assert cvae.loss(x, y=torch.tensor([0, 1, 2])).isfinite() and isinstance(vae_ext.VAE(), vae_ext.MLPVAE)
        leaked = sorted(m for m in sys.modules if m.partition(".")[0] in ("numpy", "tqdm", "matplotlib", "sklearn"))
        assert not leaked, leaked
        command = sorted(m for m in sys.modules if m == "vae_ext.cli" or m.startswith("vae_ext.cli."))
        assert not command, f"the library loaded the command's modules: {command}"
        print("ok", tuple(z.shape))
    """)
    p = _run(tmp_path, LIBRARY_ONLY, "-c", code)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "ok (3, 2)"


def test_the_blocker_blocks(tmp_path):
    """The check above means something only if the blocked modules really cannot be imported."""
    p = _run(tmp_path, LIBRARY_ONLY, "-c", "import tqdm")
    assert p.returncode != 0 and "No module named 'tqdm'" in p.stderr


@pytest.mark.parametrize("blocked,missing,argv", [
    (LIBRARY_ONLY, "numpy, tqdm, matplotlib, scikit-learn", ["train", "--epochs", "1"]),
    (["tqdm"], "tqdm", ["eval", "run"]),
    (["sklearn"], "scikit-learn", ["--help"]),
], ids=["train", "eval", "help"])
def test_the_command_without_its_extra_says_what_to_install(tmp_path, blocked, missing, argv):
    p = _run(tmp_path, blocked, "-m", "vae_ext", *argv)
    assert p.returncode == 1
    assert p.stderr == f'vae-ext: the command needs the cli extra: pip install "vae_ext[cli]" (missing: {missing})\n'
    assert p.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_the_extra_lists_what_the_command_imports():
    """pyproject.toml's cli extra and the command's check name the same distributions."""
    import tomllib

    from vae_ext.cli import CLI_REQUIREMENTS

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["dependencies"] == []
    assert sorted(meta["optional-dependencies"]["cli"]) == sorted(CLI_REQUIREMENTS.values())
    assert meta["scripts"]["vae-ext"] == "vae_ext.cli:main"
