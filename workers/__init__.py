"""ESSP: elastic streaming sequential data processing for two-stream video classification."""
__version__ = "0.1.0"
