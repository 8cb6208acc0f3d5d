"""clickstream-dp: differentially private nightly clickstream aggregates (Apache Beam)."""
from setuptools import setup

setup(
    name="clickstream-dp",
    version="0.1.0",
    description="Differential-privacy sanitization pipeline for e-commerce clickstream data (Apache Beam)",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["pipelines", "transforms", "schemas"],
    package_data={"": ["*.yaml"]},
    install_requires=[
        "apache-beam>=2.60,<3",
        "pipeline-dp>=0.3.1,<0.4",
        "dp-accounting>=0.4,<0.7",  # transforms/accounting.py (PLD); pipeline-dp imports it but does not require it
        "python-dp>=1.1.5,<2",
        "pyarrow>=14,<27",
        "numpy>=1.26,<3",
        "pyyaml>=6,<7",
        "matplotlib>=3.7,<4",  # transforms/report.py (utility report PNGs, Agg backend)
    ],
    extras_require={
        "gcp": ["apache-beam[gcp]>=2.60,<3"],
        # apache-beam[gcp]: tests/test_runners.py submits to a fake Dataflow API (offline).
        "test": ["pytest>=8", "scipy>=1.11", "pandas>=2", "duckdb>=1.0", "apache-beam[gcp]>=2.60,<3"],
        "bench": ["duckdb>=1.0"],
    },
    entry_points={"console_scripts": ["clickdp=pipelines.cli:main"]},
)
