"""`python -m moe_serve.kernels [--variants]`: build the compiled CPU kernels now (make install runs it), print where.

--variants also builds every instruction-set variant (VARIANTS), so each path compiles on this machine whatever its
CPU; tests/test_kernels.py runs the ones this CPU can. The builds run side by side, one per core (each compile is a
single compiler process).
"""

import os
import sys
from concurrent.futures import ThreadPoolExecutor

from moe_serve.kernels import build_dir, build_variant, cpu_ops, enabled, runnable, variant_names

if not enabled():
    print("compiled CPU kernels are turned off (MOE_SERVE_KERNELS=0)")
    sys.exit(0)
with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    native = pool.submit(cpu_ops)
    others = [v for v in variant_names() if v != "native"] if "--variants" in sys.argv[1:] else []
    variants = {variant: pool.submit(build_variant, variant) for variant in others}
if native.result() is None:
    print("compiled CPU kernels could not be built; the torch ops will serve (see the warning above)")
else:
    print(f"compiled CPU kernels ready in {build_dir()}")
for variant, where in variants.items():
    print(f"  {variant}: built in {where.result()} ({'runs' if runnable(variant) else 'compiles only'} on this CPU)")
