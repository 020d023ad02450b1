"""eflow_jax: few-step video generation trained from scratch with EFlow, in JAX."""
import setuptools

# Pinned to a set checked together (pip check clean); jax 0.11.2 needs Python >= 3.12.
CORE = [
    "jax==0.11.2",
    "jaxlib==0.11.2",
    "flax>=0.12.10,<0.13",
    "optax==0.2.8",
    "orbax-checkpoint>=0.12.4,<0.13",
    "grain==0.2.18",
    "array-record==0.8.6",
    "ml_collections==1.1.0",
    "clu==0.0.12",
    "absl-py",
    "numpy>=2.0",
    "tensorboardX",  # TensorBoard events without TensorFlow (clu's writers import TF).
    "av",  # PyAV: decode real videos, write mp4/gif samples.
    "pillow",  # tensorboardX encodes the sample strips it logs as PNG through PIL.
    "filelock",  # jax's compilation cache locks its entries with it (compile_cache.configure).
    "sentencepiece>=0.2,<0.3",  # The T5-family text encoders' tokenizer (models/t5.py).
]

setuptools.setup(
    name="eflow_jax",
    version="0.1.0",
    description="EFlow few-step video generators in JAX/Flax (solution flow + GLGA + path-drop guidance).",
    python_requires=">=3.12",
    packages=setuptools.find_packages(include=["eflow_jax", "eflow_jax.*"]),
    install_requires=CORE,
    extras_require={
        "cuda12": ["jax[cuda12]==0.11.2"],
        "cuda13": ["jax[cuda13]==0.11.2"],
        "tpu": ["jax[tpu]==0.11.2"],
        "tfds": ["tensorflow-datasets==4.9.10"],
        "test": ["pytest", "scipy", "scikit-video==1.1.11", "tensorflow-datasets==4.9.10"],
    },
)
