"""``torch.distributed.rpc.constants``."""

from datetime import timedelta

#: The default RPC timeout, in seconds.
DEFAULT_RPC_TIMEOUT_SEC: float = 60.0
#: ``timeout=-1``: the default.
UNSET_RPC_TIMEOUT: float = -1.0
#: The default init method.
DEFAULT_INIT_METHOD: str = "env://"
#: The default number of worker threads.
DEFAULT_NUM_WORKER_THREADS: int = 16
#: The default shutdown timeout, in seconds.
DEFAULT_SHUTDOWN_TIMEOUT: float = 0.0
#: torch's default process-group timeout.
DEFAULT_RPC_TIMEOUT: timedelta = timedelta(seconds=DEFAULT_RPC_TIMEOUT_SEC)
