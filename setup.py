"""megdet_d2: the MegDet recipe (CGBN, linear-scaling warmup LR policy) as a Detectron2 plugin.

Detectron2 itself is not on PyPI and PyTorch is brought by the user, so neither is declared here;
`make setup` installs both (see README). Development pins live in requirements/constraints.txt.
"""

from setuptools import find_packages, setup

setup(
    name="megdet_d2",
    version="0.1.0",
    description="MegDet (large mini-batch object detection) for Detectron2",
    python_requires=">=3.8",
    packages=find_packages(include=["megdet_d2", "megdet_d2.*"]),
    install_requires=[
        "fvcore",
        "iopath",
        "numpy",
        "pycocotools>=2.0.2",
        # COCO evaluation backend when detectron2's C++ one is not built (identical numbers).
        "faster-coco-eval",
        "matplotlib",
        "tabulate",
        # the launcher ends a worker together with the data-loader workers it started
        "psutil",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "black", "isort", "flake8"],
    },
)
