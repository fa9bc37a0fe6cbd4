"""firmware-sim: Modbus TCP devices whose registers follow configured signals.

Stands in for field devices in tests and the demo: each configured server listens
on its own port and answers for several unit ids; every read returns the signal's
value at the moment of the request. ``mailcatcher`` stands in for an SMTP relay.

Import the parts from their modules (``firmware_sim.fleet.SimFleet``,
``firmware_sim.config.load_sim_config``, ``firmware_sim.mailcatcher.MailCatcher``);
this package only defines the error they share, so importing it stays cheap.
"""

__all__ = ["SimulatorError"]


class SimulatorError(Exception):
    """A simulated server could not start; the message says which one and why."""
