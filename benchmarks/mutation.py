"""Mutation testing of the security-critical code: apply one listed one-line breakage ("mutant") at a
time to a *copy* of the repository and run the tests that guard that code; a mutant is *killed* when
they fail. Not part of the default suite (a few minutes on 2 CPU cores).

Why a list and not a generated set: the mutants below are the breakages that matter for a security
tool (a defense that silently does nothing, an attack that cheats, a check that lets a tampered file
through), each named, so a survivor is a concrete gap, not noise. ``mutmut`` (the ``mutation``
extra) generates operator-level mutants over whole files when one wants the exhaustive view:
``pip install -e '.[mutation]'`` and see docs/results.md.

The working tree is never touched: the code is copied (``git archive HEAD``, or the working tree with
``--worktree``) into a temporary folder, mutated there, and the tests run against that copy
(``PYTHONPATH``; no bytecode written). Each mutant must match its file exactly once, else it is
reported ``stale`` (the code moved on: update the list).

    OMP_NUM_THREADS=1 python benchmarks/mutation.py                 # all mutants, HEAD
    python benchmarks/mutation.py --only kd-temperature-1 --worktree  # one mutant, uncommitted code
    python benchmarks/mutation.py --overlay tests/test_new.py      # HEAD plus an uncommitted file
    python benchmarks/mutation.py --without-new                       # the suite without tests/test_mutants_*.py
    python benchmarks/mutation.py --json docs/bench/mutation.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    what: str
    issue15: bool = False  # one of the breakages issue 15 found surviving


LOSS_TESTS = ("tests/test_mutants_losses.py", "tests/test_mutants_core.py", "tests/test_losses.py", "tests/test_attacks.py")
OUT_TESTS = ("tests/test_mutants_output.py", "tests/test_mutants_attacks.py", "tests/test_defenses_output.py")
CKPT_TESTS = ("tests/test_mutants_core.py", "tests/test_mutants_checkpoint.py", "tests/test_checkpoint.py", "tests/test_security.py")
ATTACK_TESTS = ("tests/test_mutants_attacks.py", "tests/test_attacks.py")
TLLM_TESTS = ("tests/test_mutants_attacks.py", "tests/test_attacks.py", "tests/test_attacks_e2e.py")

MUTANTS: list[Mutant] = [
    # ---- the breakages issue 15 found surviving
    Mutant("kd-temperature-1", "nasty/attacks/kd.py",
           'T, a = self.p["temperature"], self.p["alpha"]', 'T, a = 1.0, self.p["alpha"]',
           ATTACK_TESTS + ("tests/test_attacks_e2e.py",), "KD ignores --temperature (always T = 1)", True),
    Mutant("tllm-test-split", "nasty/attacks/tllm.py",
           "val_acc = lambda model: class_accuracy(model, d.x_val, d.y_val, C)",
           "val_acc = lambda model: class_accuracy(model, d.x_test, d.y_test, C)",
           TLLM_TESTS, "TLLM identifies undistillable classes on the test split", True),
    Mutant("tllm-threshold-halved", "nasty/attacks/tllm.py",
           'delta_min = float(self.p["delta"])', 'delta_min = float(self.p["delta"]) / 2',
           TLLM_TESTS, "TLLM's threshold delta halved", True),
    Mutant("tllm-online-threshold-halved", "nasty/attacks/tllm.py",
           "streak[c] = streak[c] + 1 if v is not None and v < -delta_min else 0",
           "streak[c] = streak[c] + 1 if v is not None and v < -delta_min / 2 else 0",
           TLLM_TESTS, "TLLM online: threshold delta halved", True),
    Mutant("cli-ignores-temperature", "nasty/pipelines/attack.py", "            params[k] = a[k]\n", "            pass\n",
           ("tests/test_mutants_attacks.py", "tests/test_attacks_cli.py"), "nasty attack drops --temperature/--alpha", True),
    Mutant("cli-drops-output-defense", "nasty/pipelines/attack.py",
           'post = parse_output_defense(output_defense) if output_defense else None',
           'post = None',
           ("tests/test_mutants_attacks.py", "tests/test_defenses_output.py"), "nasty attack drops --output-defense", True),
    Mutant("oracle-ignores-output-defense", "nasty/attacks/base.py",
           "            p = self.post(p)\n", "            pass\n",
           ATTACK_TESTS + ("tests/test_defenses_output.py",), "the oracle skips the output defense", True),
    Mutant("attack-drops-output-defense", "nasty/attacks/run.py",
           "oracles = [Oracle(t, query, output_defense) for t in teachers]", "oracles = [Oracle(t, query) for t in teachers]",
           ATTACK_TESTS + ("tests/test_defenses_output.py",), "run_attack never hands the output defense to the oracle", True),
    Mutant("probe-kd-defended-from-normal", "nasty/pipelines/probe.py",
           '("kd_defended", "kd", defended)', '("kd_defended", "kd", normal)',
           ("tests/test_mutants_attacks.py", "tests/test_cli.py"), "the probe's KD-from-defended uses the normal teacher", True),
    Mutant("select-last-epoch", "nasty/train.py",
           'if cfg.select == "last" or val_acc > st.best_val:', 'if True:',
           ("tests/test_mutants_core.py", "tests/test_train.py"), "model selection keeps the last epoch", True),
    Mutant("select-no-restore", "nasty/train.py",
           "    if s.st.best_state is not None:\n        s.m.model.load_state_dict(s.st.best_state)\n",
           "    pass\n",
           ("tests/test_mutants_core.py", "tests/test_train.py"), "the best epoch is recorded but its weights are not restored", True),
    Mutant("sha256-first-mib", "nasty/checkpoint.py",
           '        for chunk in iter(lambda: f.read(1 << 20), b""):\n            h.update(chunk)\n',
           "        h.update(f.read(1 << 20))\n",
           CKPT_TESTS, "the weights' hash covers the first MiB only", True),
    Mutant("nasty-loss-sign", "nasty/losses.py",
           "return ce - omega * tau**2 * kl, {", "return ce + omega * tau**2 * kl, {",
           LOSS_TESTS, "nasty_loss: the KL term's sign flipped", True),
    Mutant("nasty-defense-sign", "nasty/defenses/nasty.py",
           "nasty_loss(z, adv_logits, batch.y, tau, omega,", "nasty_loss(z, adv_logits, batch.y, tau, -omega,",
           ("tests/test_mutants_core.py", "tests/test_defenses.py"), "the nasty defense's objective: KL sign flipped", True),
    Mutant("audit-protected-newly-swapped", "nasty/audit/analyse.py",
           '{"protected_classes": sorted(rr - tt), "still_transferred": sorted(rr & tt),',
           '{"protected_classes": sorted(tt - rr), "still_transferred": sorted(rr & tt),',
           ("tests/test_mutants_audit.py", "tests/test_audit.py"), "audit.json: protected classes computed as newly transferred", True),
    Mutant("report-protected-newly-swapped", "nasty/audit/render.py",
           '[[a, _classes(v["protected_classes"], names), _classes(v["still_transferred"], names),\n'
           '                           _classes(v["newly_transferred"], names)]',
           '[[a, _classes(v["newly_transferred"], names), _classes(v["still_transferred"], names),\n'
           '                           _classes(v["protected_classes"], names)]',
           ("tests/test_mutants_audit.py", "tests/test_audit.py"), "audit.md: protected and newly transferred columns swapped", True),
    # ---- nasty/losses.py
    Mutant("kl-sum-not-mean", "nasty/losses.py", "return (p * (safe_log_p - safe_log_q)).sum(dim=1).mean()",
           "return (p * (safe_log_p - safe_log_q)).sum(dim=1).sum()", LOSS_TESTS, "kl_div sums over the batch"),
    Mutant("kl-args-swapped", "nasty/losses.py", "return (p * (safe_log_p - safe_log_q)).sum(dim=1).mean()",
           "return (p * (safe_log_q - safe_log_p)).sum(dim=1).mean()", LOSS_TESTS, "kl_div: the sign of the log ratio flipped"),
    Mutant("tempered-times-tau", "nasty/losses.py", "return F.log_softmax(z / tau, dim=1)", "return F.log_softmax(z * tau, dim=1)",
           LOSS_TESTS, "tempered softmax multiplies by tau"),
    Mutant("kd-t-not-squared", "nasty/losses.py", "loss = a * temperature**2 * kl + (1 - a) * ce",
           "loss = a * temperature * kl + (1 - a) * ce", LOSS_TESTS, "KD term scaled by T, not T^2"),
    Mutant("kd-alpha-swapped", "nasty/losses.py", "loss = a * temperature**2 * kl + (1 - a) * ce",
           "loss = (1 - a) * temperature**2 * kl + a * ce", LOSS_TESTS, "KD: alpha weights CE instead of KL"),
    Mutant("kd-no-label-alpha", "nasty/losses.py", "a = alpha if y is not None else 1.0", "a = alpha",
           LOSS_TESTS, "KD without labels still weights the (zero) CE"),
    Mutant("kd-mask-inverted", "nasty/losses.py", "kl = (per * mask.float()).mean()", "kl = (per * (~mask).float()).mean()",
           LOSS_TESTS, "KD mask keeps the masked-out samples"),
    Mutant("adv-kl-cap-min", "nasty/losses.py", "per = per.clamp(max=kl_cap)", "per = per.clamp(min=kl_cap)",
           LOSS_TESTS, "kl_cap bounds from below"),
    Mutant("adv-kl-weight-ignored", "nasty/losses.py", "return (per * weight).mean() if weight is not None else per.mean()",
           "return per.mean()", LOSS_TESTS + ("tests/test_defenses.py",), "per-sample weight (class-selective) ignored"),
    Mutant("adv-kl-adversary-untempered", "nasty/losses.py", "log_pa = tempered_log_softmax(adversary_logits, tau)",
           "log_pa = tempered_log_softmax(adversary_logits, 1.0)", LOSS_TESTS, "adversary's distribution at T = 1"),
    Mutant("nasty-tau-not-squared", "nasty/losses.py", "return ce - omega * tau**2 * kl, {", "return ce - omega * tau * kl, {",
           LOSS_TESTS, "nasty_loss scales KL by tau, not tau^2"),
    # ---- nasty/defenses/output.py
    Mutant("topk-k-plus-1", "nasty/defenses/output.py", 'k = min(self.p["k"], p.shape[1])', 'k = min(self.p["k"] + 1, p.shape[1])',
           OUT_TESTS, "topk keeps one class too many"),
    Mutant("topk-no-renormalise", "nasty/defenses/output.py",
           "return _renormalise(torch.zeros_like(p).scatter_(1, top.indices, top.values), p)",
           "return torch.zeros_like(p).scatter_(1, top.indices, top.values)", OUT_TESTS, "topk not renormalised"),
    Mutant("round-no-floor", "nasty/defenses/output.py", "return q.scatter(1, top, q.gather(1, top).clamp_min(1.0 / scale))",
           "return q", OUT_TESTS, "round may zero the top class"),
    Mutant("round-scale", "nasty/defenses/output.py", 'scale = 10.0 ** self.p["decimals"]', 'scale = 10.0 ** (self.p["decimals"] + 1)',
           OUT_TESTS, "round keeps one decimal too many"),
    Mutant("label-global-argmax", "nasty/defenses/output.py", "return F.one_hot(p.argmax(dim=1), p.shape[1]).to(p.dtype)",
           "return F.one_hot(p.argmax(dim=1)[:1].expand(len(p)), p.shape[1]).to(p.dtype)", OUT_TESTS, "label: the first row's winner everywhere"),
    Mutant("rsig-sign", "nasty/defenses/output.py", "return _renormalise((p - r).clamp(0.0, 1.0), p)",
           "return _renormalise((p + r).clamp(0.0, 1.0), p)", OUT_TESTS, "reverse sigmoid adds the perturbation"),
    Mutant("rsig-gamma-ignored", "nasty/defenses/output.py",
           'r = self.p["beta"] * (torch.sigmoid(self.p["gamma"] * torch.log(pc / (1 - pc))) - 0.5)',
           'r = self.p["beta"] * (torch.sigmoid(torch.log(pc / (1 - pc))) - 0.5)', OUT_TESTS, "reverse sigmoid ignores gamma"),
    Mutant("noise-not-clipped", "nasty/defenses/output.py", "return _renormalise((p + noise.to(p.device)).clamp_min(0.0), p)",
           "return _renormalise(p + noise.to(p.device), p)", OUT_TESTS, "noise may give negative probabilities"),
    Mutant("noise-scale-ignored", "nasty/defenses/output.py",
           'noise = torch.randn(p.shape, generator=self.generator, dtype=torch.float64).to(p.dtype) * self.p["scale"]',
           'noise = torch.randn(p.shape, generator=self.generator, dtype=torch.float64).to(p.dtype) * 0.05',
           OUT_TESTS, "noise ignores its scale"),
    Mutant("cutoff-drops-top", "nasty/defenses/output.py", 'keep = (p >= self.p["threshold"]) | _argmax_onehot(p).bool()',
           'keep = p >= self.p["threshold"]', OUT_TESTS, "cutoff may zero every class"),
    Mutant("compose-first-only", "nasty/defenses/output.py", "        for part in self.parts:\n            p = part(p)\n",
           "        p = self.parts[0](p)\n", OUT_TESTS, "a chain applies only its first defense"),
    Mutant("renormalise-empty-row", "nasty/defenses/output.py", "        out[empty] = _argmax_onehot(fallback_from[empty])\n",
           "        pass\n", OUT_TESTS, "an emptied row stays all zeros"),
    Mutant("defended-model-undefended", "nasty/defenses/output.py", "return self.defense(F.softmax(self.model(x), dim=1))",
           "return F.softmax(self.model(x), dim=1)", OUT_TESTS, "DefendedModel returns undefended probabilities"),
    # ---- the oracle's access levels
    Mutant("oracle-topk-all", "nasty/attacks/base.py", "k = min(self.k or 1, p.shape[1])", "k = p.shape[1]",
           ATTACK_TESTS, "--query topk:K reveals every class"),
    Mutant("oracle-label-soft", "nasty/attacks/base.py", "p = F.one_hot(p.argmax(1), p.shape[1]).to(p.dtype)", "pass",
           ATTACK_TESTS, "--query label reveals the probabilities"),
    # ---- checkpoint verification
    Mutant("sha256-not-compared", "nasty/checkpoint.py", "if sha256_file(weights) != side[\"weights_sha256\"]:",
           "if False:", CKPT_TESTS, "the weights' hash is never compared"),
    Mutant("nan-weights-allowed", "nasty/checkpoint.py",
           '        if v.is_floating_point() and not torch.isfinite(v).all():\n            raise NastyError(f"{weights}: tensor',
           '        if False:\n            raise NastyError(f"{weights}: tensor', CKPT_TESTS, "NaN/inf weights load"),
    Mutant("shape-check-skipped", "nasty/checkpoint.py",
           '    check_state_fits(_signature(meta.state_dict()), header, str(weights), arch)\n', "    pass\n",
           CKPT_TESTS, "the header is not checked against the meta model"),
    Mutant("dtype-check-skipped", "nasty/checkpoint.py", "        if got[k] != (shape, dtype):", "        if got[k][0] != shape:",
           CKPT_TESTS, "dtypes not compared"),
    Mutant("classes-count-unchecked", "nasty/checkpoint.py",
           "if len(classes) != n or not all(isinstance(c, str) for c in classes):",
           "if not all(isinstance(c, str) for c in classes):", CKPT_TESTS, "classes may disagree with num_classes"),
    Mutant("std-zero-allowed", "nasty/checkpoint.py", 'if not all(a > 0 for a in norm["std"]):', "if False:",
           CKPT_TESTS, "a zero normalisation std is accepted"),
    Mutant("sidecar-size-unchecked", "nasty/checkpoint.py", "if size > MAX_SIDECAR_BYTES:", "if False:",
           CKPT_TESTS, "a huge sidecar is parsed"),
    Mutant("num-classes-lower-bound", "nasty/checkpoint.py", "if not 2 <= n <= MAX_CLASSES:", "if not 3 <= n <= MAX_CLASSES:",
           CKPT_TESTS, "a two-class checkpoint is refused"),
    Mutant("input-dim-upper-bound", "nasty/checkpoint.py", "0 < s <= MAX_INPUT_DIM for s in shape", "0 < s < MAX_INPUT_DIM for s in shape",
           CKPT_TESTS, "the largest allowed input size is refused"),
    Mutant("sidecar-size-bound", "nasty/checkpoint.py", "if size > MAX_SIDECAR_BYTES:", "if size >= MAX_SIDECAR_BYTES:",
           CKPT_TESTS, "a sidecar of exactly the limit is refused"),
    Mutant("digest-format-unchecked", "nasty/checkpoint.py",
           'if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):', "if False:",
           CKPT_TESTS, "any string passes as a SHA-256"),
]


def snapshot(dest: Path, worktree: bool) -> None:
    if worktree:  # tracked and untracked-but-not-ignored files as they are now
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               check=True, capture_output=True).stdout.decode().split("\0")
        for n in filter(None, names):
            src = ROOT / n
            if src.is_file():
                (dest / n).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / n)
        return
    blob = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, check=True, capture_output=True).stdout
    tar = dest.parent / "head.tar"
    tar.write_bytes(blob)
    with tarfile.open(tar) as t:
        t.extractall(dest)
    tar.unlink()


def run_tests(copy: Path, tests: tuple[str, ...], timeout: int) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", *tests], cwd=copy,
                           env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        return -1, "timeout", time.perf_counter() - t0


def first_failure(output: str) -> str | None:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ")[0]
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="mutant ids")
    ap.add_argument("--issue15", action="store_true", help="only the breakages issue 15 found surviving")
    ap.add_argument("--worktree", action="store_true", help="mutate a copy of the working tree, not of HEAD")
    ap.add_argument("--overlay", nargs="*", default=[], help="working-tree files copied over the snapshot (e.g. a new test file)")
    ap.add_argument("--without-new", action="store_true", help="leave out tests/test_mutants_*.py (the score before them)")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    chosen = [m for m in MUTANTS if (not a.only or m.id in a.only) and (not a.issue15 or m.issue15)]
    if a.list:
        for m in chosen:
            print(f"{m.id:32s} {m.file:28s} {m.what}")
        return 0
    with tempfile.TemporaryDirectory(prefix="nasty-mutation-") as tmp:
        copy = Path(tmp) / "repo"
        copy.mkdir()
        snapshot(copy, a.worktree)
        for f in a.overlay:
            (copy / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, copy / f)

        def tests_of(m: Mutant) -> tuple[str, ...]:
            ts = tuple(t for t in m.tests if not (a.without_new and Path(t).name.startswith("test_mutants_")))
            return tuple(t for t in ts if (copy / t).is_file())

        all_tests = tuple(dict.fromkeys(t for m in chosen for t in tests_of(m)))
        broken: set[str] = set()  # test files that fail on the unmutated code: left out, and said so
        for t in all_tests:
            rc, out, secs = run_tests(copy, (t,), a.timeout)
            print(f"baseline {t}: {'ok' if rc == 0 else 'FAILS unmutated: left out'} ({secs:.0f} s)", flush=True)
            if rc != 0:
                broken.add(t)
                print("   " + (first_failure(out) or out[-300:]), flush=True)
        results = []
        for m in chosen:
            path = copy / m.file
            src = path.read_text()
            n = src.count(m.old)
            if n != 1:
                results.append({"id": m.id, "file": m.file, "status": "stale", "detail": f"pattern found {n} times"})
                print(f"{m.id:32s} stale (pattern found {n} times)", flush=True)
                continue
            tests = tuple(t for t in tests_of(m) if t not in broken)
            if not tests:
                results.append({"id": m.id, "file": m.file, "status": "stale", "detail": "every test file fails unmutated"})
                print(f"{m.id:32s} no test file passes unmutated", flush=True)
                continue
            path.write_text(src.replace(m.old, m.new))
            try:
                rc, out, secs = run_tests(copy, tests, a.timeout)
            finally:
                path.write_text(src)
            status = "survived" if rc == 0 else "killed"
            killer = first_failure(out) if rc not in (0, -1) else ("timeout" if rc == -1 else None)
            results.append({"id": m.id, "file": m.file, "what": m.what, "issue15": m.issue15, "status": status,
                            "killed_by": killer, "seconds": round(secs, 1), "tests": list(tests)})
            print(f"{m.id:32s} {status:8s} {secs:5.0f} s  {killer or ''}", flush=True)
    if broken:
        print(f"left out (failing on the unmutated code): {', '.join(sorted(broken))}")
    done = [r for r in results if r["status"] != "stale"]
    killed = sum(r["status"] == "killed" for r in done)
    print(f"\nmutation score: {killed}/{len(done)} killed ({100 * killed / max(len(done), 1):.0f}%)"
          + (f"; {len(results) - len(done)} stale" if len(done) != len(results) else ""))
    for r in done:
        if r["status"] == "survived":
            print(f"  survived: {r['id']} ({r['file']}): {r['what']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"source": "worktree" if a.worktree else "HEAD", "without_new": a.without_new,
                                            "left_out_failing_unmutated": sorted(broken),
                                            "killed": killed, "total": len(done), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
