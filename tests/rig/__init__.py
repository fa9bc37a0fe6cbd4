"""The test rig: real servers on loopback ports picked at run time, and probes to assert with."""

from tests.rig.mosquitto import Mosquitto
from tests.rig.mqtt_probe import MqttProbe, ProbeMessage, at_least
from tests.rig.ports import LOOPBACK, free_port, port_accepts, wait_port
from tests.rig.servers import ServerError, ci_mode, log_tail, require_binary
from tests.rig.smtp import ReceivedMail, SmtpSink
from tests.rig.victoria import Series, VictoriaMetrics, sample_count

__all__ = [
    "LOOPBACK",
    "Mosquitto",
    "MqttProbe",
    "ProbeMessage",
    "ReceivedMail",
    "Series",
    "ServerError",
    "SmtpSink",
    "VictoriaMetrics",
    "at_least",
    "ci_mode",
    "free_port",
    "log_tail",
    "port_accepts",
    "require_binary",
    "sample_count",
    "wait_port",
]
