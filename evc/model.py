"""EVC's records and the names of their states, in one place.

The enums are :class:`~enum.StrEnum` (through :class:`Name`): a member *is* its string
(``JobState.QUEUED == "queued"``, ``json.dumps`` and f-strings write ``queued``, ``repr`` too is
the string's), so records stored in Redis, answers sent over the API and messages read exactly
as before. Code compares, stores and documents the members; the strings live here. The sets
and tuples of states hold the plain strings (choices for click and marshmallow).

The records are :class:`~typing.TypedDict`: the JSON objects the store keeps and the API shows,
with their fields named and typed. Fields a record may lack (older records, optional parts,
fields only some code paths write) are ``NotRequired``. A state field is typed ``str``: a
record read back from Redis holds the plain string, which equals its enum member.
"""

# no ``from __future__ import annotations``: TypedDict reads NotRequired[...] at runtime
from enum import IntEnum, StrEnum
from typing import Any, NotRequired, TypedDict

#: a JSON object whose shape is not (yet) a record of this module
JSON = dict[str, Any]


class Name(StrEnum):
    """A string with a name in code: equal to, hashed, formatted and shown (``repr`` too: in
    messages and in lists) exactly as the string it stands for."""

    def __repr__(self) -> str:
        return repr(self.value)


def strings(*members: StrEnum) -> tuple[str, ...]:
    """The plain strings of *members* (for choices handed to libraries that treat enums apart)."""
    return tuple(m.value for m in members)


# ----------------------------------------------------------------------------- jobs
class JobState(Name):
    """A job's lifecycle: ``queued`` -> ``running`` -> one of the terminal states."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    #: some targets fell short of what was asked (per-target reasons in the job's results)
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: every job state, in lifecycle order
JOB_STATES: tuple[str, ...] = strings(*JobState)
#: the states a job never leaves (except by an explicit resume of an FL job)
TERMINAL_STATES: frozenset[str] = frozenset(
    strings(JobState.SUCCEEDED, JobState.PARTIAL, JobState.FAILED, JobState.CANCELLED)
)
#: the states a job is in before it ends
ACTIVE_JOB_STATES: tuple[str, ...] = strings(JobState.QUEUED, JobState.RUNNING)


class JobKindName(Name):
    """Every kind of job EVC runs (:data:`evc.jobs.JOB_KINDS` says how each is executed)."""

    NOOP = "noop"
    REGISTER = "register"
    IMPORT = "import"
    FACTS = "facts"
    RECONNECT = "reconnect"
    PROVISION = "provision"
    HEALTH = "health"
    LEVEL = "level"
    FL = "fl"
    FL_INSTALL = "fl-install"
    FL_PARTITION = "fl-partition"
    MODEL_QUANTIZE = "model-quantize"
    DEPLOY = "deploy"
    DEPLOY_REMOVE = "deploy-remove"
    PARALLEL_INFER = "parallel-infer"
    INFER_JOINT = "infer-joint"
    INFER_SPLIT = "infer-split"
    MODEL_PROFILE = "model-profile"
    DEVICE_CALIBRATE = "device-calibrate"


class Queue(Name):
    """The Celery queues jobs are sent to."""

    DEFAULT = "default"
    SSH = "ssh"
    ANSIBLE = "ansible"
    FL = "fl"


class EventType(Name):
    """The ``type`` of the job events the core writes (a task may add its own)."""

    JOB = "job"
    LOG = "log"
    STEP = "step"
    RETRY = "retry"
    LEVEL = "level"
    FL = "fl"


class HostStatus(Name):
    """How one target of a job's step ended (a provision job's, a level step's per-device result)."""

    OK = "ok"
    FAILED = "failed"
    UNREACHABLE = "unreachable"
    #: not run there: the device's state, privilege or lock refused it
    REFUSED = "refused"
    CANCELLED = "cancelled"


class Progress(TypedDict):
    done: int
    total: int
    percent: float


class Job(TypedDict):
    """A job as the store keeps it (:func:`evc.jobs.new_job` makes one)."""

    id: str
    kind: str
    state: str
    progress: JSON
    targets: list[str]
    params: JSON
    summary: JSON
    error: JSON | None
    created_by: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested: bool
    attempt: int
    lost: int
    queued_at: float | None
    not_before: float | None
    retry_of: NotRequired[str | None]
    #: per-target results: only in the view the API shows (:func:`evc.jobs.public`)
    results: NotRequired[JSON]
    #: an FL job's state and rounds: only in the view of :func:`evc.fl.service.view`
    fl: NotRequired[JSON]


# ----------------------------------------------------------------------------- devices
class DeviceState(Name):
    """Where a device is: registration (``pending``, ``registering``, ``unreachable``,
    ``failed``), then health (``online``, ``degraded``, ``offline``)."""

    PENDING = "pending"
    REGISTERING = "registering"
    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"
    UNREACHABLE = "unreachable"
    FAILED = "failed"


# ----------------------------------------------------------------------------- deployments
class DeploymentState(Name):
    """A deployment as a whole (``deploying`` while its job runs; ``partial``: some devices
    failed; ``removing`` while its removal job runs, or after one left devices behind)."""

    DEPLOYING = "deploying"
    RUNNING = "running"
    PARTIAL = "partial"
    FAILED = "failed"
    REMOVING = "removing"


class DeploymentDeviceState(Name):
    """One device of a deployment."""

    PENDING = "pending"
    RUNNING = "running"
    FAILED = "failed"
    REMOVED = "removed"
    #: a rollout is switching it to another version
    UPDATING = "updating"
    #: it failed its health gate on a rollout's version and runs its previous version again
    ROLLED_BACK = "rolled-back"
    #: the health checks lost it (offline); re-converged when it comes back
    UNREACHABLE = "unreachable"


#: the states health checks move a registered device between
HEALTH_STATES: tuple[str, ...] = strings(DeviceState.ONLINE, DeviceState.DEGRADED, DeviceState.OFFLINE)
#: device states that receive no new work (``unreachable``: registration never reached it)
OFFLINE_STATES: frozenset[str] = frozenset(strings(DeviceState.OFFLINE, DeviceState.UNREACHABLE))
#: states of devices a sweep leaves alone (registration not finished or failed)
UNSWEPT_STATES: frozenset[str] = frozenset(strings(DeviceState.PENDING, DeviceState.REGISTERING, DeviceState.FAILED))
#: device states that take new work (playbooks, levels, FL rounds)
RUNNABLE_STATES: tuple[str, ...] = strings(DeviceState.ONLINE, DeviceState.DEGRADED)
#: device states whose registration has not finished
REGISTERING_STATES: tuple[str, ...] = strings(DeviceState.PENDING, DeviceState.REGISTERING)


class HealthSource(Name):
    """What the latest health record came from."""

    SSH = "ssh"
    HEARTBEAT = "heartbeat"
    PROBE = "probe"


class OfflinePolicy(Name):
    """What a level job does with offline members."""

    SKIP = "skip"
    FAIL = "fail"
    WAIT = "wait"


class Privilege(Name):
    """The rights of the account EVC logs in with on a device."""

    USER = "user"
    SUDO = "sudo"
    ROOT = "root"


#: privileges in increasing order of rights
PRIVILEGE_RANK: dict[str, int] = {p.value: rank for rank, p in enumerate(Privilege)}


class Level(IntEnum):
    """The function levels a device is raised through; :attr:`label` is the name shown."""

    CONNECTED = 0
    PROVISIONED = 1
    MONITORED = 2
    DEPLOYABLE = 3
    APPLICATION = 4

    @property
    def label(self) -> str:
        return self.name.lower()


#: the function levels by number: their names as the API and CLI show them
LEVEL_NAMES: dict[int, str] = {int(lvl): lvl.label for lvl in Level}


class JumpHost(TypedDict):
    host: str
    port: int
    username: str
    host_key: NotRequired[str | None]


class Health(TypedDict, total=False):
    """A device's health record: the latest metrics and how the checks went."""

    load1: float | None
    load5: float | None
    load15: float | None
    mem_used_ratio: float | None
    disk_used_ratio: float | None
    temperature_c: float | None
    uptime_s: float | None
    misses: int
    ok_streak: int
    checked_at: float
    error: JSON | None
    source: str
    breaches: list[str]


class Device(TypedDict):
    """A device as the store keeps it (:func:`evc.devices.new_record` makes one)."""

    id: str
    name: str
    host: str
    port: int
    username: str
    labels: dict[str, str]
    jump_host: JumpHost | None
    state: str
    host_key: str | None
    privilege: str | None
    capabilities: list[str]
    facts: JSON
    level: int
    cluster_id: str | None
    health: Health | None
    error: JSON | None
    created_at: float
    created_by: str
    registered_at: float | None
    last_seen: float | None
    level_detail: NotRequired[JSON | None]
    exporter: NotRequired[JSON | None]
    fl_client: NotRequired[JSON | None]
    updated_at: NotRequired[float]
    #: when its host key was last re-pinned (``POST /devices/<id>/host-key``): kept, not shown
    repinned_at: NotRequired[float]
    #: the hash of the device's own token: kept by the store, never shown
    token_hash: NotRequired[str]


# ----------------------------------------------------------------------------- clusters
class ClusterProfile(Name):
    """The interworking profiles (``evc/profiles/profiles.yml`` defines what each runs)."""

    DIRECT = "direct"
    CONTAINER = "container"
    K3S = "k3s"
    K8S = "k8s"


class Cluster(TypedDict):
    """A cluster as the store keeps it (:func:`evc.clusters.create` makes one)."""

    id: str
    name: str
    profile: str
    target_level: int
    labels: dict[str, str]
    #: per playbook, its variables (secrets sealed)
    vars: dict[str, Any]
    server_id: str | None
    created_at: float
    created_by: str
    #: the k3s join token, sealed: kept, never shown
    join_token: NotRequired[str]


class ClusterView(Cluster, total=False):
    """A cluster as the API shows it (:func:`evc.clusters.public`)."""

    members: list[str]
    size: int
    level: int
    states: dict[str, int]


# ----------------------------------------------------------------------------- tokens
class Scope(Name):
    """What an operator token may do: ``admin`` everything, ``read`` only read, ``models`` (an
    EVF service account) push models and variants, read them and the clusters' hardware."""

    ADMIN = "admin"
    READ = "read"
    MODELS = "models"


class PrincipalKind(Name):
    """Who a bearer token speaks for."""

    OPERATOR = "operator"
    DEVICE = "device"
    ENROLLMENT = "enrollment"


class Token(TypedDict):
    """An operator token (its hash is kept by the store, never shown)."""

    id: str
    name: str
    scopes: list[str]
    created_at: float
    created_by: str
    revoked: bool
    expires_at: float | None
    last_used_at: float | None
    prefix: str
    hash: NotRequired[str]
    revoked_at: NotRequired[float]


class Enrollment(TypedDict):
    """An enrollment token: registers up to ``max_uses`` devices until ``expires_at``."""

    id: str
    created_at: float
    expires_at: float
    uses_left: int
    max_uses: int
    labels: dict[str, str]
    allow_networks: list[str]
    created_by: str
    revoked: bool
    prefix: str
    hash: NotRequired[str]


# ----------------------------------------------------------------------------- federated learning
class FLPhase(Name):
    """Where an FL job's round engine is (:mod:`evc.fl.orchestrator`)."""

    #: shown for a job whose engine has not started (no FL state yet)
    QUEUED = "queued"
    TRAINING = "training"
    CLOSING = "closing"
    CLOSED = "closed"
    WAITING = "waiting"
    STOPPED = "stopped"
    DONE = "done"
    FAILED = "failed"


#: phases in which a job has a round in flight or about to start
ACTIVE_PHASES: tuple[str, ...] = strings(FLPhase.TRAINING, FLPhase.CLOSING, FLPhase.CLOSED, FLPhase.WAITING)
#: phases between rounds: the next round may start
BETWEEN_ROUNDS: tuple[str, ...] = strings(FLPhase.CLOSED, FLPhase.WAITING)
#: phases with a round open
IN_ROUND: tuple[str, ...] = strings(FLPhase.TRAINING, FLPhase.CLOSING)


class FLState(TypedDict, total=False):
    """An FL job's round-engine state (the store's ``fl_state``), changed by compare-and-set."""

    phase: str
    round: int
    next_round: int
    #: the open round attempt's token (None between rounds)
    token: str | None
    attempt: int
    rounds: int
    queue: str
    first_round: int
    selected: list[str]
    skipped: JSON
    deadline: float
    waiting_since: float | None
    started_at: float
    #: how many times the open round was dispatched (a recovery dispatches it again)
    dispatches: int


__all__ = [
    "ACTIVE_JOB_STATES",
    "ACTIVE_PHASES",
    "BETWEEN_ROUNDS",
    "HEALTH_STATES",
    "IN_ROUND",
    "JOB_STATES",
    "JSON",
    "LEVEL_NAMES",
    "Name",
    "OFFLINE_STATES",
    "PRIVILEGE_RANK",
    "REGISTERING_STATES",
    "RUNNABLE_STATES",
    "TERMINAL_STATES",
    "UNSWEPT_STATES",
    "Cluster",
    "ClusterProfile",
    "ClusterView",
    "Device",
    "DeviceState",
    "Enrollment",
    "EventType",
    "FLPhase",
    "FLState",
    "Health",
    "HealthSource",
    "HostStatus",
    "Job",
    "JobKindName",
    "JobState",
    "JumpHost",
    "Level",
    "OfflinePolicy",
    "Privilege",
    "PrincipalKind",
    "Progress",
    "Queue",
    "Scope",
    "Token",
    "strings",
]
