"""Import the repository's stand-alone scripts (``tools/``, ``experiments/``) in tests."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_script(relpath):
    """Import a repository script by path (detectron2 installs a package named ``tools``)."""
    path = os.path.join(REPO, relpath)
    spec = importlib.util.spec_from_file_location(os.path.basename(relpath)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
