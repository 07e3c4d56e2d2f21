"""GPU-node deployment: what the container image carries (`bundle`), the container entrypoint
(`entrypoint`, with the on-node TensorRT engine cache in `engines`), and N local replicas for
scale-out tests (`replicas`). Kubernetes manifests live in deploy/k8s, the Dockerfile in
deploy/docker; docs/deploy.md describes all of it.
"""
