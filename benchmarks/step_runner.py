"""The one way the benchmark drivers run a numbered script: a subprocess at one CPU thread, its output appended to
<run_dir>/log.txt, timed in wall seconds and in the CPU seconds of that child alone (which other load on the
machine inflates far less than the wall time)."""
import os
import shlex
import subprocess
import sys
import time

from ldm.util import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StepRunner:
    def __init__(self, quiet=False):
        self.quiet = quiet
        self.env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def __call__(self, run_dir, script, *args):
        """Wall seconds of the step."""
        return self.timed(run_dir, script, *args)[0]

    def timed(self, run_dir, script, *args):
        """(wall seconds, CPU seconds of the child); a failed step is one sentence naming its log."""
        cmd = [sys.executable, os.path.join(REPO, script), *map(str, args)]
        os.makedirs(run_dir, exist_ok=True)
        if not self.quiet:
            print("  $", " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
        start = time.time()
        with open(os.path.join(run_dir, "log.txt"), "a") as log:
            log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
            _, status, usage = os.wait4(proc.pid, 0)  # reaps the child and gives its own rusage
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise UserError(f"{script} failed with exit status {proc.returncode}; see {run_dir}/log.txt")
        return time.time() - start, usage.ru_utime + usage.ru_stime
