"""kldb-boundary: generate images on an image classifier's decision boundary for any class subset.

The pipeline, the KLDB metric and the classifier adapters are defined once, in the top-level module
``pipeline_kldb_boundary`` (the file diffusers loads as a community pipeline); this package re-exports them and adds
what surrounds the pipeline: the bundled digits world, Hub export, metrics, sweeps and the CLI.
"""

from pipeline_kldb_boundary import (
    ImageClassifier,
    KLDBBoundaryPipeline,
    KLDBBoundaryPipelineOutput,
    KLDBGuidanceCallback,
    as_image_classifier,
    check_classes,
    entropy,
    kldb_score,
)

from .hub import export_folder, publish, write_pipeline_folder

__version__ = "0.1.0"

__all__ = [
    "ImageClassifier",
    "KLDBBoundaryPipeline",
    "KLDBBoundaryPipelineOutput",
    "KLDBGuidanceCallback",
    "__version__",
    "as_image_classifier",
    "check_classes",
    "entropy",
    "export_folder",
    "kldb_score",
    "publish",
    "write_pipeline_folder",
]
