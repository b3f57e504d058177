"""``python _exit_after.py SCRIPT ARGS...``: run SCRIPT as ``__main__``, then leave without interpreter teardown.

Used by tests/_multiproc.py for the torchrun launches (see there for why). An exception or ``sys.exit`` in SCRIPT
still ends the process as it would have.
"""
import os
import runpy
import sys

script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(script))  # what `python SCRIPT` puts first
runpy.run_path(script, run_name="__main__")
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
