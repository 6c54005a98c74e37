# The README's commands are these targets. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

.PHONY: deps
deps: ## install the Debian packages the local stack needs (containerd, runc, buildah, CNI, PostgreSQL, ...)
	@hack/install-deps.sh

.PHONY: venv
venv: $(VENV)/.installed ## create the Python environment (.venv) with kubetask and its dev tools
$(VENV)/.installed: pyproject.toml
	@hack/venv.sh $(VENV)
	@touch $@

.PHONY: binaries
binaries: ## build Kubernetes, etcd, CoreDNS and Helm from their Go modules (cached by version)
	@hack/build-binaries.sh

.PHONY: cluster-up
cluster-up: deps binaries ## start the local single-node cluster (idempotent)
	@hack/cluster-up.sh

.PHONY: cluster-down
cluster-down: ## stop the local cluster and remove what it mounted and the rules it added
	@hack/cluster-down.sh

.PHONY: kubeconfig
kubeconfig: ## print the path of the admin kubeconfig
	@hack/print.sh kubeconfig

.PHONY: images
images: deps ## build the runner and operator images (buildah) and import them into the cluster
	@hack/images.sh all

.PHONY: runner-image
runner-image: ## print the runner image reference
	@hack/print.sh runner-image

.PHONY: operator-image
operator-image: ## print the operator image reference
	@hack/print.sh operator-image

.PHONY: db-up
db-up: deps ## start PostgreSQL with the kubetask database
	@hack/db.sh up

.PHONY: db-down
db-down: ## stop PostgreSQL
	@hack/db.sh down

.PHONY: database-url
database-url: ## print the database URL usable from the host
	@hack/print.sh database-url

.PHONY: install
install: venv ## install kubetask (CRDs + operator, Helm chart) into the current cluster
	@hack/install-operator.sh

.PHONY: helm-crds
helm-crds: ## copy crds/*.yaml into the Helm chart (helm/kubetask/crds/)
	@mkdir -p helm/kubetask/crds
	@rm -f helm/kubetask/crds/*.yaml
	@cp crds/*.yaml helm/kubetask/crds/

.PHONY: helm-check
helm-check: ## the chart's CRDs are copies of crds/, and `helm lint` is clean
	@diff -r crds helm/kubetask/crds >/dev/null || { echo "helm/kubetask/crds differs from crds/: run 'make helm-crds'" >&2; diff -r crds helm/kubetask/crds >&2; exit 1; }
	@source hack/lib.sh && helm lint --strict helm/kubetask --set database.url=postgresql+psycopg://u:p@db:5432/kubetask
	@source hack/lib.sh && helm lint --strict helm/kubetask --set database.url=postgresql+psycopg://u:p@db:5432/kubetask \
		--set metrics.serviceMonitor.enabled=true,metrics.prometheusRule.enabled=true,metrics.grafanaDashboard.enabled=true >/dev/null

.PHONY: api-url
api-url: ## print the kubetask API's base URL, reachable from the host
	@hack/print.sh api-url

.PHONY: up
up: cluster-up db-up images install ## cluster + database + images + operator

.PHONY: down
down: ## stop everything `make up` started
	@hack/db.sh down
	@hack/cluster-down.sh

.PHONY: demo
demo: up ## bring the stack up and run the hello example end to end
	@hack/demo.sh

.PHONY: kind-up
kind-up: ## (users with Docker) create a kind cluster, build the images with docker and load them
	@hack/kind-up.sh

.PHONY: lint
lint: venv ## ruff and mypy
	$(VENV)/bin/ruff check operator tests bench examples
	$(VENV)/bin/ruff format --check operator tests bench examples
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy tests bench
	# The code-first example as its users' project: kubetask from outside (examples/ruff.toml).
	cd examples && $(abspath $(VENV))/bin/mypy codefirst

.PHONY: unit
unit: venv ## the unit tests (no cluster, no database)
	$(VENV)/bin/pytest -m 'not e2e and not db' tests

.PHONY: test
test: venv lint ## everything: lint, type check, unit and end-to-end tests (starts what it needs)
	@hack/test.sh
