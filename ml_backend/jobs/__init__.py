"""RQ entry points, thin: ``train_project`` (train a project from Label Studio's annotations and re-score its pool,
``ml_backend.jobs.train``), ``rescore_chunk`` (a helper that scores one chunk of the pool, ``.rescore``) and
``pretrain_project`` (the cold start after an import: self-supervised pretraining + coverage-ordered first queue,
``.pretrain``).

RQ resolves jobs by dotted path, and those paths are stored with queued jobs: ``ml_backend.jobs.train_project`` and
``ml_backend.jobs.rescore_chunk`` stay valid (a job queued by an older version still runs). The round itself is
``ml_backend.active_learning.run_round``; the names below are re-exported for callers of the former ``jobs`` module.
"""

from ml_backend.active_learning import LabelledTile, TrainingError
from ml_backend.inference.scoring import embed_images
from ml_backend.labelstudio.annotations import annotation_signature, decode_annotations, task_image_url
from ml_backend.labelstudio.project import ProjectNotFound, project_label_config
from ml_backend.labelstudio.tasks import calibration_crops, load_task_image
from ml_backend.queue.coordination import run_exclusive
from ml_backend.queue.rescoring import collect_rescore, finish_rescore, rescore_pool, start_rescore
from ml_backend.training.recipe import ENSEMBLE_MEMBERS, initial_model, train_config, train_ensemble

from .pretrain import pretrain_project
from .rescore import rescore_chunk
from .train import TrainOutcome, _train_and_rescore, project_strategy, train_project, train_version

__all__ = [
    "ENSEMBLE_MEMBERS",
    "LabelledTile",
    "ProjectNotFound",
    "TrainOutcome",
    "TrainingError",
    "_train_and_rescore",
    "annotation_signature",
    "calibration_crops",
    "collect_rescore",
    "decode_annotations",
    "embed_images",
    "finish_rescore",
    "initial_model",
    "load_task_image",
    "project_label_config",
    "pretrain_project",
    "project_strategy",
    "rescore_chunk",
    "rescore_pool",
    "run_exclusive",
    "start_rescore",
    "task_image_url",
    "train_config",
    "train_ensemble",
    "train_project",
    "train_version",
]
