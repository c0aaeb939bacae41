"""Many runs of one program (`python -m` or a script), forked after its imports.

A test of a command line's refusals runs the program once per bad input: as
separate processes, each pays the interpreter's and the imports' start-up
(about 1 s of CPU with dp-accounting), which summed to most of a minute on
the 2-core CI machine. Here one subprocess imports what the program needs,
then forks a child per input that runs the program as `python -m` would
(`runpy`, `__main__`), with its own stdout, stderr and exit code. The
children share no state but the imports: each parses its own flags.
"""

import json
import os
import subprocess
import sys
from typing import List, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DRIVER = r"""
import importlib, json, os, runpy, sys, tempfile, traceback

module, cases, warm = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
script = module.endswith(".py")
if script:  # as `python script.py`: its folder first on the path
    sys.path.insert(0, os.path.dirname(os.path.abspath(module)))
for name in warm:
    importlib.import_module(name)
results = []
for argv in cases:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.argv = [module, *argv]
            code = 0
            try:
                if script:
                    runpy.run_path(module, run_name="__main__")
                else:
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        results.append([os.waitstatus_to_exitcode(status), out.read(), err.read()])
print(json.dumps(results))
"""


def run_many(
    module: str, cases: Sequence[Sequence[str]], warm: Sequence[str] = ()
) -> List[subprocess.CompletedProcess]:
    """Runs `python -m module *argv` for each argv of `cases`; one result per case.

    Args:
      module: The program: a `python -m` name, or the path of a script (`.py`).
      cases: The command lines, without the program.
      warm: Modules imported once before the forks (never `module` itself:
        run again as `__main__`, it would define its flags twice).

    Returns:
      `subprocess.CompletedProcess`es (returncode, stdout, stderr), in order.
    """
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    driver = subprocess.run(
        [sys.executable, "-c", _DRIVER, module, json.dumps([list(c) for c in cases])]
        + [json.dumps(list(warm))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if driver.returncode != 0:
        raise AssertionError(f"the driver failed: {driver.stderr[-3000:]}")
    return [
        subprocess.CompletedProcess([module, *argv], code, out, err)
        for argv, (code, out, err) in zip(cases, json.loads(driver.stdout))
    ]
