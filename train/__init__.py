"""The alignment fine-tuning and evaluation harness (``python -m train.align``, ``python -m train.evaluate``).

Importing it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment names a policy: OpenMP threads that
wait for work then sleep at once instead of spinning first. torch's CPU wheel and otfast's CPU kernel share
one OpenMP runtime, which reads the policy once, when torch is first imported; both entry points import
this package before torch. On a machine that other jobs keep busy, spinning threads take the cores the
working ones need (README, "Threads on a busy machine", measured with ``python -m benchmarks.threads``, which
also says what the policy costs on an idle machine). ``OPENMP_SPINS`` says that torch was
imported first with no policy set, so its threads spin (``train.align`` then says so when it uses several).
"""

import os
import sys

OPENMP_SPINS = "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
