"""``python -m grpo_guard.bench ...`` = ``grpo-guard bench ...``."""
import sys

from .cli import main

sys.exit(main())
