"""`python -m moe_serve.kernels [--variants]`: build the compiled CPU kernels now (make install runs it), print where.

--variants also builds every instruction-set variant (VARIANTS), so each path compiles on this machine whatever its
CPU; tests/test_kernels.py runs the ones this CPU can.
"""

import sys

from moe_serve.kernels import build_dir, build_variant, cpu_ops, enabled, runnable, variant_names

if not enabled():
    print("compiled CPU kernels are turned off (MOE_SERVE_KERNELS=0)")
elif cpu_ops() is None:
    print("compiled CPU kernels could not be built; the torch ops will serve (see the warning above)")
else:
    print(f"compiled CPU kernels ready in {build_dir()}")
    if "--variants" in sys.argv[1:]:
        for variant in variant_names():
            where = build_variant(variant)
            print(f"  {variant}: built in {where} ({'runs' if runnable(variant) else 'compiles only'} on this CPU)")
