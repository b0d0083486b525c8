"""The worker imports the trainer's own async_ckpt, whatever directory the trainer runs in.

It is started with ``python -c``, whose first import path is the current
directory: a checkout or a stray ``async_ckpt/`` there would otherwise be the
package the worker runs, a different version from the trainer's, or none.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import async_ckpt

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import async_ckpt as ac

    with ac.AsyncCheckpointer(timeout=60) as ck:
        ck.save({"w": torch.arange(10.0)}, sys.argv[1]).result(timeout=120)
    out = ac.load_state_dict(sys.argv[1])
    assert torch.equal(out["w"], torch.arange(10.0))
    print("saved and loaded")
    """
)


def test_worker_ignores_an_async_ckpt_in_the_working_directory(tmp_path: Path) -> None:
    decoy = tmp_path / "cwd" / "async_ckpt"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the decoy async_ckpt in the working directory')\n")
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(async_ckpt.__file__).parent.parent), *filter(None, [env.get("PYTHONPATH")])]
    )
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        cwd=decoy.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "saved and loaded" in proc.stdout
