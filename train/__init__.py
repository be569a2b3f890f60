"""The alignment fine-tuning and evaluation harness (``python -m train.align``, ``python -m train.evaluate``).

Importing it sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment names a policy: OpenMP threads that
wait for work then sleep at once instead of spinning first. torch's CPU wheel and otfast's CPU kernel share
one OpenMP runtime, which reads the policy once, when torch is first imported; both entry points import
this package before torch. On a machine that other jobs keep busy, spinning threads take the cores the
working ones need: with other processes busy on a 2-core machine, torch's default two threads made an
all-MiniLM-L6-v2 step several times slower than one thread, and with the passive policy two threads were
as fast as one or faster (README, "Alignment fine-tuning"). ``OPENMP_SPINS`` says that torch was imported
first with no policy set, so its threads spin (``train.align`` then says so when it uses several).
"""

import os
import sys

OPENMP_SPINS = "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
