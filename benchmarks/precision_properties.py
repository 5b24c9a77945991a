"""No false failures at the default tolerances: 200 random weight sets (the public strategies, with the
specials that make sense at each precision) refitted into an fp16 and a bf16 engine, each verified
against eager at the precision's default tolerances (``refitcore.options.PRECISION_TOLERANCES``) and
audited exactly (cached vs fallback). The property is ``tests/test_precision_e2e.py``'s
(``random_weights_refit_correctly``; its slow test runs the same); this script times it and records
the result in ``benchmarks/results/precision_properties.md``.

    python benchmarks/precision_properties.py                 # 200 examples per precision
    python benchmarks/precision_properties.py --examples 20
"""
from __future__ import annotations

import argparse
import time

from _common import machine_info, record, set_threads
from refitcore.options import PRECISION_TOLERANCES
from tests.test_precision_e2e import PROPERTY_EXAMPLES, PROPERTY_SPECIALS, random_weights_refit_correctly


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=PROPERTY_EXAMPLES)
    args = parser.parse_args(argv)
    set_threads(2)
    info = machine_info()
    lines = ["| precision | examples | default rtol, atol | specials | result | time |", "|---|---|---|---|---|---|"]
    failed = 0
    for precision in sorted(PROPERTY_SPECIALS):
        t0 = time.perf_counter()
        try:
            random_weights_refit_correctly(precision, args.examples)
            outcome = "pass (every example verified and audited exactly)"
        except AssertionError as err:   # Hypothesis re-raises the shrunk failing example
            failed += 1
            outcome = "FAIL: " + " ".join(str(err).split())[:300]
        rtol, atol = PRECISION_TOLERANCES[precision]
        specials = ", ".join(PROPERTY_SPECIALS[precision])
        lines.append(f"| {precision} | {args.examples} | {rtol:g}, {atol:g} | {specials} | {outcome} "
                     f"| {time.perf_counter() - t0:.1f} s |")
        print(lines[-1], flush=True)
    record("precision_properties", f"random weights at the default tolerances: {args.examples} examples per precision "
           f"(tests/test_precision_e2e.py Net: conv, BatchNorm fold, two square linears, head)", "\n".join(lines), info)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
