"""The project file, ``qualify.toml``, read into frozen dataclasses.

Every problem is reported at once, each naming its key, the value found and
what is wrong, so that ``qualify check`` can list them all in one run.

- ``project``: the file -> ``Project`` (warehouse, parent model, collections, server, storage)
- ``realtime``: [event_models.NAME] and their filters, [realtime]
- ``syncs``: [[syncs]] and [delivery]
- ``operations``: [auth] [tls] [limits] [metrics]
- ``reader``: the problem collector and the value rules the sections share
"""

from .cluster import ClusterSettings
from .operations import Limits, MetricsSettings, Operations, TlsSettings
from .project import (DEFAULT_MAP_SIZE, DEFAULT_PORT, Attribute, Collection, ParentModel, Project,
                      ServerSettings, Warehouse, load_project, parse_project)
from .reader import NAME_RE, Problem, ProjectError, parse_duration
from .realtime import DEFAULT_SESSION_TIMEOUT, DEFAULT_WATCH_BUFFER, DEFAULT_WATCH_MAX_LAG

__all__ = [
    "DEFAULT_MAP_SIZE", "DEFAULT_PORT", "DEFAULT_SESSION_TIMEOUT", "DEFAULT_WATCH_BUFFER", "DEFAULT_WATCH_MAX_LAG",
    "NAME_RE", "Attribute", "ClusterSettings", "Collection", "Limits", "MetricsSettings", "Operations", "ParentModel", "Problem",
    "Project", "ProjectError", "ServerSettings", "TlsSettings", "Warehouse", "load_project", "parse_duration",
    "parse_project",
]
