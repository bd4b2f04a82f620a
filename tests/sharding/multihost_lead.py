"""Process 0 of the two-process CPU run in test_multihost.py: run the workload, write its tokens.

    python multihost_lead.py COORDINATOR_ADDRESS OUT_JSON [ENGINE FLAGS...]

The engine flags are the ones the follower gets on its `pagedjax generate` command
line, so both processes build the same engine.
"""

import json
import sys

from parallel_workload import run_workload

from server.cli import add_engine_args, engine_config


def main() -> None:
    address, out, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config(parser.parse_args(flags + ["--coordinator-address", address, "--process-id", "0"]))

    from engine.engine import LLMEngine

    engine = LLMEngine(config, progress=False)
    outputs = run_workload(engine)
    engine.shutdown()  # releases the follower
    with open(out, "w") as f:
        json.dump(outputs, f)


if __name__ == "__main__":
    main()
