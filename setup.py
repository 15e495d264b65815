from setuptools import find_packages, setup

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
    ],
    extras_require={
        'test': ['pytest>=8', 'pytest-xdist'],
        # libtpu: compile the real train step for a TPU slice ahead of time, on any machine
        # (experiments/benchmark.py --analyze_only --topology=v5p:4x4x4)
        'tpu': ['jax[tpu]'],
    },
)
