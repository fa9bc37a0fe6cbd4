"""firmware-sim: Modbus devices whose registers follow configured signals.

Stands in for field devices in tests and the demo: each configured server is a
Modbus TCP listener, an RS-485 bus on a pseudo-terminal (RTU), or RTU over TCP,
answering for several unit ids; every read returns the signal's value at the
moment of the request. Faults are switched per unit at run time, and every
request is counted per unit. ``mailcatcher`` stands in for an SMTP relay.

Import the parts from their modules (``firmware_sim.fleet.SimFleet``,
``firmware_sim.faults.Fault``, ``firmware_sim.config.load_sim_config``,
``firmware_sim.mailcatcher.MailCatcher``); this package only defines the error
they share, so importing it stays cheap.
"""

__all__ = ["SimulatorError"]


class SimulatorError(Exception):
    """A simulated server could not start; the message says which one and why."""
