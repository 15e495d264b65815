from setuptools import find_packages, setup

NOTEBOOK = ['ipykernel', 'matplotlib', 'mediapy', 'imageio-ffmpeg', 'treescope']

setup(
    name='sora_jax',
    version='0.1.0',
    description='Sora-style text-to-video diffusion transformers in JAX/Flax',
    packages=find_packages(include=['sora_jax', 'sora_jax.*']),
    python_requires='>=3.11',
    install_requires=[
        'jax>=0.10.2',
        'flax>=0.12.8',
        'optax>=0.2.8',
        'orbax-checkpoint>=0.12.8',
        'grain>=0.2.18',
        'tensorflow-datasets>=4.9.10',
        'array_record>=0.8',
        'importlib_resources',  # TFDS builds without TensorFlow need it on 3.11
        'ml-collections>=1.1',
        'absl-py',
        'einops',
        'numpy',
        'pillow',  # GIFs
        'av>=14',  # mp4 via PyAV, which bundles FFmpeg
        'tensorboardX',  # TensorBoard events without TensorFlow
        'safetensors',  # pretrained weights (T5/UMT5 text encoders)
        'sentencepiece',  # T5 tokenizers (spiece.model)
        'tokenizers',  # T5 tokenizers saved as tokenizer.json only
        'scipy',  # FVD's matrix square root
    ],
    extras_require={
        # experiments/notebooks/analysis.ipynb (plus jupyter, or any notebook frontend)
        'notebook': NOTEBOOK,
        # torch + transformers build the random reference models that pretrained-weight loaders are
        # checked against (no download); torch 2.13.0 installs from a local wheel here.
        # nbclient runs the notebook headlessly. The I3D import's reference, cd-fvd (its copy of
        # piergiaj's PyTorch I3D), installs apart with --no-deps (README, "Tests"): its torchvision,
        # built for another torch, breaks transformers and diffusers.
        'test': ['pytest>=8', 'pytest-xdist', 'torch==2.13.0', 'transformers>=5', 'diffusers', 'protobuf',
                 'nbclient', 'nbformat', *NOTEBOOK],
        # libtpu: compile the real train step for a TPU slice ahead of time, on any machine
        # (experiments/benchmark.py --analyze_only --topology=v5p:4x4x4)
        'tpu': ['jax[tpu]'],
    },
)
