"""The client process of a deployment: :class:`ClientAgent` and the data a site trains on.

A site runs ``fedloom client`` (or a :class:`ClientAgent` from Python): it dials the server,
pulls tasks, trains with the same local-training step as the simulation and pushes signed
updates. It shares only the transport (:mod:`fedloom.transport`) with the server's side.
"""

from fedloom.agent.agent import AgentError, AgentOptions, AgentReport, ClientAgent, task_from_dict
from fedloom.agent.sitedata import load_site_data

__all__ = ["AgentError", "AgentOptions", "AgentReport", "ClientAgent", "load_site_data", "task_from_dict"]
