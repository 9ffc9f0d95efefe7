# The two commands: `make run` (the demo) and `make test` (the whole suite).
# Both call `make install` first; every step is idempotent and cached under .venv/ and .cache/.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
KAFKA_LIBS := .cache/kafka/libs
HADOOP_AWS_LIBS := .cache/hadoop-aws/libs
CONNECT_LIBS := .cache/connect/libs
PG_BIN := /usr/lib/postgresql/15/bin
M2 := $(CURDIR)/.cache/m2
PYTEST_ARGS ?=

.PHONY: install run run-s3 test test-fast lint bench airflow chromium postgresql clean-lake kafka-up kafka-down

install: $(VENV)/.installed $(KAFKA_LIBS)/.complete $(CONNECT_LIBS)/.complete postgresql $(HADOOP_AWS_LIBS)/.complete

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,airflow,s3-server,cdc]'
	$(BIN)/python -m ipykernel install --sys-prefix --name lambdalake --display-name "lambdalake (.venv)" >/dev/null
	@touch $@

$(KAFKA_LIBS)/.complete: infra/kafka/pom.xml
	@command -v mvn >/dev/null || { echo "error: Maven (mvn) is needed to fetch the Kafka broker jars; install it (apt-get install maven)"; exit 1; }
	@rm -rf $(KAFKA_LIBS)
	mvn -q -B -f infra/kafka/pom.xml -Dmaven.repo.local=$(M2) dependency:copy-dependencies
	@touch $@

# Spark's s3a connector (batch/spark_session.py): hadoop-aws + the AWS SDK v2 modules it uses, 13 MB (not the 686 MB bundle)
$(HADOOP_AWS_LIBS)/.complete: infra/hadoop-aws/pom.xml
	@command -v mvn >/dev/null || { echo "error: Maven (mvn) is needed to fetch Spark's s3a jars; install it (apt-get install maven)"; exit 1; }
	@rm -rf $(HADOOP_AWS_LIBS)
	mvn -q -B -f infra/hadoop-aws/pom.xml -Dmaven.repo.local=$(M2) dependency:copy-dependencies
	@touch $@

# Kafka Connect (standalone) + the Debezium PostgreSQL connector of `lambdalake cdc`
$(CONNECT_LIBS)/.complete: infra/debezium/pom.xml
	@command -v mvn >/dev/null || { echo "error: Maven (mvn) is needed to fetch the Kafka Connect jars; install it (apt-get install maven)"; exit 1; }
	@rm -rf $(CONNECT_LIBS)
	mvn -q -B -f infra/debezium/pom.xml -Dmaven.repo.local=$(M2) dependency:copy-dependencies
	@touch $@

postgresql:  # Debian's PostgreSQL 15 server of `lambdalake cdc` (needs root or sudo where it is missing)
	@test -x $(PG_BIN)/postgres || { S=$$([ "$$(id -u)" = 0 ] || echo sudo); $$S apt-get update -qq && \
	  $$S env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15; }

run: install
	$(BIN)/lambdalake demo

# the same demo with the lake in a bucket of the embedded S3 server (s3://lake/demo)
run-s3: install
	$(BIN)/lambdalake demo --s3

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check lambdalake wiring batch speed serving audit dags tests bench

bench: install  # batch, speed and serving benchmarks (never part of make test); BENCH_ARGS=--quick for a short run
	$(BIN)/python bench/run.py $(BENCH_ARGS)

kafka-up: install
	$(BIN)/lambdalake kafka up

kafka-down: install
	$(BIN)/lambdalake kafka down

airflow: install  # Airflow standalone with dags/, AIRFLOW_HOME=.airflow/; prints the UI address and login
	$(BIN)/lambdalake airflow $(AIRFLOW_ARGS)

chromium:  # the headless browser of the Airflow UI test (Debian packages; needs root or sudo)
	@command -v chromium >/dev/null || { S=$$([ "$$(id -u)" = 0 ] || echo sudo); $$S apt-get update -qq && \
	  $$S env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

clean-lake:
	-$(BIN)/lambdalake kafka down
	rm -rf data/master data/views data/checkpoints data/kafka
