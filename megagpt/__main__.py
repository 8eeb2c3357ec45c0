import sys

from megagpt.training.preemption import hold_stop_signals

if sys.argv[1:2] in (["train"], ["finetune"]):
    hold_stop_signals()  # before the imports below, which take seconds

from megagpt.cli import main  # noqa: E402

sys.exit(main())
