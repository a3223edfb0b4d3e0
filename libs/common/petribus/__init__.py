"""petribus: AI agents as Petri nets on an event-sourced NATS JetStream bus.

The public SDK is re-exported here; everything else is internal to the services.
"""

from petribus.bot import Bot, BotLocation
from petribus.context import BotContext
from petribus.errors import NetDefinitionError, PetribusError
from petribus.net import Handoff, Net
from petribus.resources import Image, TaskPolicy, Volume

__all__ = ["Bot", "BotContext", "BotLocation", "Handoff", "Image", "Net", "NetDefinitionError", "PetribusError", "TaskPolicy",
           "Volume"]
__version__ = "0.1.0"
