"""fxsdc: simulate and detect silent data corruption in transformer attention with torch.fx."""

from .errors import UserError
from .faults import Fault, FaultInjector, InjectionConfig, InjectionLocation
from .pipeline import Instrumented, instrument

__all__ = ["Fault", "FaultInjector", "InjectionConfig", "InjectionLocation", "Instrumented",
           "UserError", "instrument"]
