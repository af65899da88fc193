"""`python -m moe_serve.kernels`: build the compiled CPU kernels now (make install runs it), print where."""

from moe_serve.kernels import build_dir, cpu_ops, enabled

if not enabled():
    print("compiled CPU kernels are turned off (MOE_SERVE_KERNELS=0)")
elif cpu_ops() is None:
    print("compiled CPU kernels could not be built; the torch ops will serve (see the warning above)")
else:
    print(f"compiled CPU kernels ready in {build_dir()}")
