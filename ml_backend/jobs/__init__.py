"""RQ entry points, thin: ``train_project`` (train a project from Label Studio's annotations and re-score its pool,
``ml_backend.jobs.train``), ``rescore_chunk`` (a helper that scores one chunk of the pool, ``.rescore``) and
``pretrain_project`` (the cold start after an import: self-supervised pretraining + coverage-ordered first queue,
``.pretrain``). ``predict_backlog`` (``.backlog``) is queued by its module path.

RQ resolves jobs by dotted path, and those paths are stored with queued jobs: ``ml_backend.jobs.train_project``,
``ml_backend.jobs.rescore_chunk`` and ``ml_backend.jobs.pretrain_project`` stay valid (a job queued by an older
version still runs). The round itself is ``ml_backend.active_learning.run_round``. Only the public API other packages
use is re-exported here; everything else is imported from its module.
"""

from .pretrain import pretrain_project
from .rescore import rescore_chunk
from .train import train_project

__all__ = ["pretrain_project", "rescore_chunk", "train_project"]
