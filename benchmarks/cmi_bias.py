"""Bias of the batch estimates of the conditional mutual information of outputs given the class.

    OMP_NUM_THREADS=1 python benchmarks/cmi_bias.py

Synthetic outputs with a known CMI: class ``c`` has a mean output ``m_c ~ Dirichlet(1)`` and its samples are
``P ~ Dirichlet(alpha * m_c)``, so ``E[P | c] = m_c`` and ``CMI = E_c E_P KL(P || m_c)``, computed by Monte Carlo
on 200,000 samples with the exact ``m_c`` (the truth). Batches draw uniform labels (so a batch may hold a class
once, or not at all) and are scored by the in-batch estimate with each sample in its own class mean (``plug-in``)
and without it (``leave-one-out``, :func:`nasty.metrics.class_conditional_mi`), averaged over 300 batches; the
whole-split plug-in form (:func:`nasty.metrics.served_cmi`) is scored at split sizes too. Prints a Markdown
table of the relative bias (percent of the truth).
"""

from __future__ import annotations

import argparse

import torch

from nasty.metrics import class_conditional_mi


def truth(m: torch.Tensor, alpha: float, g: torch.Generator, n: int = 200_000) -> float:
    y = torch.randint(0, len(m), (n,), generator=g)
    p = sample(m, y, alpha, g)
    return float((p * (p.clamp_min(1e-300).log() - m[y].log())).sum(1).mean())


def sample(m: torch.Tensor, y: torch.Tensor, alpha: float, g: torch.Generator) -> torch.Tensor:
    conc = alpha * m[y]
    gam = torch._standard_gamma(conc, generator=g)  # Dirichlet by normalised gammas (seeded)
    return gam / gam.sum(1, keepdim=True)


def estimate(m: torch.Tensor, alpha: float, n: int, reps: int, g: torch.Generator, loo: bool) -> float:
    vals = []
    for _ in range(reps):
        y = torch.randint(0, len(m), (n,), generator=g)
        vals.append(float(class_conditional_mi(sample(m, y, alpha, g).clamp_min(1e-300).log(), y, leave_one_out=loo)))
    return sum(vals) / len(vals)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alpha", type=float, default=20.0, help="Dirichlet concentration (larger: outputs closer to the class mean)")
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"alpha {args.alpha}, {args.reps} batches per cell; bias in percent of the Monte Carlo truth\n")
    print("| classes | true CMI (nats) | n | plug-in | leave-one-out |\n|---|---|---|---|---|")
    for C in (10, 100):
        g = torch.Generator().manual_seed(C)
        m = sample(torch.full((1, C), 1.0 / C, dtype=torch.float64), torch.zeros(C, dtype=torch.long), float(C), g).clamp_min(1e-6)  # m_c ~ Dirichlet(1)
        m = m / m.sum(1, keepdim=True)
        t = truth(m, args.alpha, g)
        for n in (64, 256, 1000 * C // 10):
            reps = args.reps if n <= 256 else max(20, args.reps // 10)
            pi, loo = (estimate(m, args.alpha, n, reps, g, lo) for lo in (False, True))
            print(f"| {C} | {t:.4f} | {n} | {100 * (pi - t) / t:+.1f}% | {100 * (loo - t) / t:+.1f}% |")


if __name__ == "__main__":
    main()
