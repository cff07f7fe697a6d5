"""The child process of :func:`workbench.report.render.render_report`: papermill on a fresh kernel."""

import json
import sys

from workbench.report.render import _execute

sys.exit(_execute(json.loads(sys.argv[1])))
