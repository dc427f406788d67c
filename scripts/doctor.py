"""`make doctor`: is this machine ready for evolm, and which command fixes what is not (src/evolm/doctor.py).

Runs with the system Python (standard library only), before the virtual environment exists:

    python3 scripts/doctor.py [--offline] [--json]

Exit status 1 when a required asset cannot be had (the registry no longer serves it, or serves it changed).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# load evolm/doctor.py by path: importing the package would import torch, which may not be installed yet
_spec = importlib.util.spec_from_file_location("evolm_doctor", Path(__file__).resolve().parents[1] / "src/evolm/doctor.py")
doctor = importlib.util.module_from_spec(_spec)
sys.modules["evolm_doctor"] = doctor
_spec.loader.exec_module(doctor)

if __name__ == "__main__":
    sys.exit(doctor.main())
