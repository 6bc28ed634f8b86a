# Deploy the TM3 local proxy with `twistd -ny tm3lp.tac` (or -y to daemonize).
# Settings come from the environment; TM3_REMOTE, TM3_PIPES and at least one
# of TM3_SOCKS, TM3_TRANSPARENT, TM3_FORWARD are required:
#   TM3_REMOTE=203.0.113.5:6000 TM3_PIPES=4 TM3_KEY_FILE=/etc/tm3/tm3.key \
#   TM3_SOCKS=tcp:1080:interface=127.0.0.1 twistd -ny tm3lp.tac
# Every variable is in tm3/lp/tap.py's ENVIRONMENT (and the README).
import sys

from twisted.application import service
from twisted.logger import ILogObserver
from twisted.python import usage

from tm3.cli import EXIT_USAGE
from tm3.logs import tac_observer
from tm3.lp.tap import makeService, options_from_env

try:
    config = options_from_env()
except usage.UsageError as e:
    print(f"tm3lp.tac: {e}", file=sys.stderr)
    sys.exit(EXIT_USAGE)  # a service manager need not retry

application = service.Application("tm3lp")
observer = tac_observer(config["log-format"])  # TM3_LOG_FORMAT=json: JSON lines on stdout
if observer is not None:
    application.setComponent(ILogObserver, observer)
makeService(config).setServiceParent(application)
