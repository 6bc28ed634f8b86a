"""TM3 works installed the way users install it: ``pip install .`` (not
editable) into a fresh virtual environment, then ``twistd`` run from any
directory finds the ``tm3rp`` and ``tm3lp`` plugins, and the console
scripts are on the venv's PATH."""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

from tests.support.processes import REPO_ROOT


def test_pip_install_into_fresh_venv_lists_plugins(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run(
        [str(bin_dir / "pip"), "install", "-q", "--disable-pip-version-check", str(REPO_ROOT)],
        check=True,
        env=clean_env,
        cwd=tmp_path,
        timeout=600,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        [str(bin_dir / "twistd"), "--help"], capture_output=True, text=True, env=clean_env, cwd=elsewhere, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "tm3rp" in out.stdout and "tm3lp" in out.stdout, out.stdout
    # The plugin must come from site-packages, not from the checkout.
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import tm3, twisted.plugins.tm3_plugins as p; print(tm3.__file__); print(p.__file__)"],
        capture_output=True, text=True, env=clean_env, cwd=elsewhere, timeout=60,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert str(env_dir) in line and str(REPO_ROOT) not in line, where.stdout
    rp_help = subprocess.run(
        [str(bin_dir / "twistd"), "tm3rp", "--help"],
        capture_output=True,
        text=True,
        env=clean_env,
        cwd=elsewhere,
        timeout=60,
    )
    assert "--pipes" in rp_help.stdout and "--max-payload" in rp_help.stdout, rp_help.stdout + rp_help.stderr
    # TLS pipes: pyOpenSSL came with the install, and the RP's tls: is ours
    # (Twisted's own server tls: plugin sits in the same directory).
    tls = subprocess.run(
        [str(bin_dir / "twistd"), "-n", "tm3rp", "--pipes", "1", "--listen", "tls:0:privateKey=k.pem:certificate=none.pem"],
        capture_output=True, text=True, env=clean_env, cwd=elsewhere, timeout=60,
    )  # fmt: skip
    assert tls.returncode != 0 and "Traceback" not in tls.stdout + tls.stderr, tls.stdout + tls.stderr
    assert "--listen: tls: cannot read the certificate file 'none.pem'" in tls.stdout + tls.stderr, (
        tls.stdout + tls.stderr
    )
    for script in ("tm3-testserver", "tm3-testclient", "tm3-redirect", "tm3-demo"):
        assert (bin_dir / script).exists(), script
        helped = subprocess.run(
            [str(bin_dir / script), "--help"], capture_output=True, text=True, env=clean_env, timeout=60
        )
        assert helped.returncode == 0 and "usage" in helped.stdout.lower(), (script, helped.stdout, helped.stderr)
    # A bad option is a usage error naming the option, not a traceback.
    bad = subprocess.run(
        [str(bin_dir / "twistd"), "-n", "tm3rp", "--pipes", "0"],
        capture_output=True,
        text=True,
        env=clean_env,
        cwd=elsewhere,
        timeout=60,
    )
    assert bad.returncode != 0
    assert "--pipes must be in 1..1024" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr
