from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = next(
    line.split("'")[1] for line in (here / 'dvt_timm' / '__init__.py').read_text().splitlines()
    if line.startswith('__version__'))

setup(
    name='dvt-timm',
    version=version,
    description='Denoising Vision Transformers (DVT) as a timm plug-in: clean dense ViT features',
    long_description=(here / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.9',
    # weights/ (shipped denoisers and the manifest of Hub releases) installs as dvt_timm.weights.
    packages=find_packages(include=['dvt_timm', 'dvt_timm.*']) + ['dvt_timm.weights'],
    package_dir={'dvt_timm.weights': 'weights'},
    package_data={'dvt_timm.weights': ['manifest.json', '*/config.json', '*/model.safetensors', '*/README.md',
                                       '*/*.txt', '*/*.png']},
    install_requires=[
        'torch>=2.4',  # fused Adam on the CPU (stage 1), torch.compiler.is_compiling
        'timm>=1.0.21,<1.1',  # models build on the meta device (the early "not a ViT" check)
        'huggingface_hub>=0.30',  # ModelHubMixin's paper_url
        'safetensors>=0.4',
        'numpy',
        'pillow',
        'tqdm',
    ],
    extras_require={
        'dev': ['pytest>=7'],
    },
    entry_points={'console_scripts': ['dvt-timm=dvt_timm.cli:main']},
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
