"""Run several ``kembed`` commands one after another in one process, for tests that start
several processes: ``accelerate launch tests/launch_cli.py train rlag ... --- eval ...``.
One launch (one import of torch per process) serves every command; a command that fails ends
the process with its exit code; after the last one the process group is torn down, as
``kembed.cli.run`` does after a command."""

import sys

from kembed import distributed
from kembed.cli import app


def main(argv: list[str]) -> int:
    commands = [[]]
    for arg in argv:
        if arg == "---":
            commands.append([])
        else:
            commands[-1].append(arg)
    for command in commands:
        code = app(command, prog_name="kembed", standalone_mode=False)
        if code:
            return code
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
