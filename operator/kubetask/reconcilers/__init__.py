"""kopf handlers: thin translations of Kubernetes events into controller calls."""
