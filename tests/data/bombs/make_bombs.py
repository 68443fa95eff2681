"""Re-create the two decompression bombs (needs ~2.5 GB of memory and ~10 s).

    .venv/bin/python tests/data/bombs/make_bombs.py
"""

from pathlib import Path

import jpeg_ls
import numpy as np
import openjpeg

HERE = Path(__file__).resolve().parent
zeros = np.zeros((20000, 20000), dtype=np.uint8)
(HERE / "zeros-20000.jls").write_bytes(bytes(jpeg_ls.encode_array(zeros)))
(HERE / "zeros-20000.j2k").write_bytes(bytes(openjpeg.encode(zeros, use_mct=False)))
