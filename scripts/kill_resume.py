"""Kill-at-random check of examples/train_lm.py's checkpoints and --resume (not run by CI).

    PYTHONPATH=. python scripts/kill_resume.py --kills 4             # ~3 min on a 2-core CPU
    PYTHONPATH=. python scripts/kill_resume.py --kills 10 --seed 1 --workdir /tmp/kr

1. A reference run (tiny model, --steps steps, a checkpoint every --ckpt-every steps), uninterrupted.
2. The same run in another directory, killed with SIGKILL --kills times and restarted with
   --resume after each kill. The kill moments alternate: a random delay after the train step
   compiled (mid-training, often inside a metrics append), the moment a checkpoint write is seen
   in progress (an orbax *.orbax-checkpoint-tmp* folder in checkpoints/), a random delay after the
   start (imports, restore, the metrics rewrite).
3. Each restart must print "resumed from <checkpoints>/<S>" with S the newest complete checkpoint
   the kill left (or warn that a newer one is damaged and fall back), and every loss it writes to
   metrics.jsonl must equal the reference's; the last restart runs to the end.
Exit status 0 when every check holds; the log lines say what each kill hit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_lm.py")


def flags(args, out_dir):
    return [sys.executable, "-u", SCRIPT, "--preset", "tiny", "--max-corpus-bytes", "300000",
            "--batch-size", "8", "--seq-len", "32", "--eval-batches", "2", "--log-every", "1",
            "--no-progress", "--steps", str(args.steps), "--ckpt-every", str(args.ckpt_every),
            "--eval-every", "25", "--keep-checkpoints", "2", "--sample-tokens", "0",
            "--out-dir", out_dir]


def losses(out_dir):
    """{(split, step): loss} of metrics.jsonl (a partial last line skipped)."""
    got = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        for line in fh:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            got[(r["split"], r["step"])] = r["loss"]
    return got


def complete_steps(out_dir):
    d = os.path.join(out_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def start(cmd, log):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def read(path):
    with open(path, errors="replace") as fh:
        return fh.read()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--workdir", help="default: a new temporary directory")
    p.add_argument("--tolerance", type=float, default=0.0, help="allowed |loss difference|")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir or tempfile.mkdtemp(prefix="kill_resume-")
    os.makedirs(work, exist_ok=True)
    ref_dir, run_dir = os.path.join(work, "reference"), os.path.join(work, "killed")
    shutil.rmtree(ref_dir, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    failures = []

    print(f"reference run in {ref_dir} ...", flush=True)
    with open(ref_dir + ".log", "w") as log:
        rc = start(flags(args, ref_dir), log).wait()
    if rc != 0:
        sys.exit(f"the reference run failed (rc {rc}); see {ref_dir}.log")
    want = losses(ref_dir)

    def check_losses(what):
        got = losses(run_dir)
        worst = 0.0
        for key, loss in got.items():
            if key not in want:
                failures.append(f"{what}: {key} not in the reference")
                continue
            worst = max(worst, abs(loss - want[key]))
        if worst > args.tolerance:
            failures.append(f"{what}: losses differ from the reference by up to {worst:g}")
        return len(got), worst

    modes = ["train", "checkpoint", "startup"]
    for i in range(args.kills + 1):
        last = i == args.kills
        expect = complete_steps(run_dir)[-1:]
        resume = bool(expect)  # killed before the first checkpoint: start again afresh
        cmd = flags(args, run_dir) + (["--resume"] if resume else [])
        log_path = os.path.join(work, f"segment{i}.log")
        mode = modes[i % len(modes)]
        with open(log_path, "w") as log:
            proc = start(cmd, log)
            hit = "finished"
            if not last:
                t0 = time.monotonic()
                delay = rng.uniform(0.5, 8.0)
                while proc.poll() is None:
                    text = read(log_path)
                    if mode == "startup" and time.monotonic() - t0 > delay:
                        hit = f"{delay:.1f} s after the start"
                        break
                    if "compiled the train step" in text:
                        if mode == "train" and ("bits/byte" in text or "resumed" in text):
                            time.sleep(rng.uniform(0.5, 4.0))
                            hit = "mid-training"
                            break
                        d = os.path.join(run_dir, "checkpoints")
                        if mode == "checkpoint" and os.path.isdir(d) and any("tmp" in n for n in os.listdir(d)):
                            time.sleep(rng.uniform(0.0, 0.02))
                            hit = "during a checkpoint write"
                            break
                    time.sleep(0.002 if "compiled the train step" in text else 0.05)
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                else:
                    hit = "finished before the kill"
            rc = proc.wait()
        text = read(log_path)
        m = re.search(r"resumed from .*/checkpoints/(\d+)", text)
        resumed = int(m.group(1)) if m else None
        skipped = re.findall(r"checkpoints/(\d+) is damaged", text)
        status = f"segment {i}: {'--resume ' if resume else 'fresh, '}killed {hit} (rc {rc})" if not last \
            else f"segment {i}: {'--resume' if resume else 'fresh'} to the end (rc {rc})"
        if resume and resumed is None and "nothing to train" not in text:
            # a kill before the restore finished prints nothing: fine unless the run went on
            if "compiled the train step" in text:
                failures.append(f"segment {i}: trained without a 'resumed from' line")
        elif resume and resumed is not None and resumed != expect[0] and not skipped:
            failures.append(f"segment {i}: resumed from {resumed}, the newest complete "
                            f"checkpoint was {expect[0]}")
        n, worst = check_losses(f"segment {i}") if os.path.exists(
            os.path.join(run_dir, "metrics.jsonl")) else (0, 0.0)
        print(f"{status}; newest complete checkpoint before it {expect[0] if expect else '-'}, "
              f"resumed from {resumed if resumed is not None else '-'}"
              f"{', skipped damaged ' + ','.join(skipped) if skipped else ''}; "
              f"checkpoints now {complete_steps(run_dir)}; {n} records, "
              f"max |loss - reference| {worst:g}", flush=True)
        if last and (rc != 0 or (n and max(s for _, s in losses(run_dir)) != args.steps)):
            failures.append(f"segment {i}: the last resume did not finish (rc {rc}); see {log_path}")
    final = losses(run_dir)
    if sorted(final) != sorted(want):
        failures.append(f"the killed run's records {len(final)} != the reference's {len(want)}")
    for f in failures:
        print("FAIL:", f)
    print("OK: every resume continued from the last complete checkpoint with identical losses"
          if not failures else f"{len(failures)} failure(s); logs in {work}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
