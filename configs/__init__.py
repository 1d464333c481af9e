"""Config files for `--config=configs/<name>.py[:variant]`; each has `get_config(arg=None)`.

`pip install` installs this package next to ncf_jax, so a config file anywhere can start
with `from configs import default`. `--config` takes a file path, which resolves from a
checkout's root; elsewhere, pass the installed file: `--config="$(python -c 'import configs;
print(configs.DIR)')/mlperf.py:runlocal"`.
"""

import os

DIR = os.path.dirname(os.path.abspath(__file__))  # the folder of these config files
