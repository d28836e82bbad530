import os

os.environ.setdefault("DISTILLZOO_PLUGINS", "")
