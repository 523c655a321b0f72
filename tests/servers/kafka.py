"""A real Apache Kafka cluster (KRaft mode, no ZooKeeper) for the kafka input and output tests.

The broker, the storage tool and the perf-test tool come from Maven Central
(``tests/servers/kafka/pom.xml``: ``org.apache.kafka:kafka_2.13`` and ``kafka-tools``), copied
once into ``~/.cache/kubetrail/kafka-<version>/lib`` and run on the local Java 17.

Shape: ``brokers`` nodes (3 by default), each both broker and controller (KRaft "combined"
mode, a static quorum of all nodes), on loopback with four listeners each:

* ``PLAIN`` (PLAINTEXT): what most tests and the inter-broker traffic use;
* ``SASL`` (SASL_PLAINTEXT with SCRAM-SHA-256 and SCRAM-SHA-512): the user ``kubetrail`` is
  created when the storage is formatted (``--add-scram``), so it works from the first second;
* ``TLS`` (SSL): a server certificate signed by a test CA made here (PEM keystore, no keytool);
* ``CONTROLLER``: the quorum.

Three nodes fit easily: each JVM runs with a 256 MB heap and measured 365-380 MB resident when
idle and 445-455 MB after the benchmark's 2 million records (about 1.4 GB for the cluster on a
24 GB machine), so the tests get a real
replicated cluster (replication factor 3, ``min.insync.replicas`` 2) where a broker can be
stopped and the topic stays writable with ``acks=all``. Topic auto-creation is off, as in most
production clusters: the tests create their topics (and a missing topic is a tested error).

``python -m tests.servers kafka up DIR`` starts a cluster detached (for people and the
benchmark) and writes ``DIR/env``; ``python -m tests.servers kafka down DIR`` stops it.
"""

from __future__ import annotations

import base64
import datetime
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

from tests.servers import HERE, ServerProcess, ServerUnavailable, cache_root, free_port, maven_lib, port_open
from tests.timing import scaled

START_TIMEOUT = 180.0  # three JVMs on a loaded 2-core machine: 10-40 s
HEAP = "256m"
SASL_USER = "kubetrail"
SASL_PASSWORD = "kubetrail-secret"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
PERF_TOOL = "org.apache.kafka.tools.ProducerPerformance"


def pom() -> Path:
    return HERE / "kafka" / "pom.xml"


def version() -> str:
    match = re.search(r"<artifactId>kafka_2.13</artifactId>\s*<version>([^<]+)</version>", pom().read_text())
    assert match, f"{pom()} does not pin kafka_2.13"
    return match.group(1)


def lib_dir() -> Path:
    return cache_root() / f"kafka-{version()}" / "lib"


def build() -> Path:
    """The jars (fetched once); :class:`ServerUnavailable` says what is missing."""
    return maven_lib("Kafka", pom(), lib_dir())


def java_command(lib: Path, main: str, *args: str, heap: str = HEAP) -> list[str]:
    return [
        "java",
        f"-Xms{heap}",
        f"-Xmx{heap}",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        # log4j 2's default configuration: errors only, to the console (our log file)
        "-cp",
        f"{lib}/*",
        main,
        *args,
    ]


def make_tls(directory: Path) -> tuple[Path, Path]:
    """A test CA and a server certificate for 127.0.0.1/localhost: (CA PEM, key+chain PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetrail test Kafka CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    keystore = directory / "server.pem"
    # Kafka's PEM keystore: an unencrypted PKCS#8 key followed by the certificate chain.
    keystore.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM)
        + ca.public_bytes(serialization.Encoding.PEM)
    )
    return ca_path, keystore


class Node(ServerProcess):
    """One KRaft node (broker + controller): its ports, directories and process. The cluster
    waits for its nodes together (:meth:`KafkaCluster.wait_ready`); a node is stopped with
    SIGTERM, a controlled shutdown that moves leadership first, given 60 s."""

    stop_timeout = 60.0

    def __init__(self, node_id: int, workdir: Path) -> None:
        self.name = f"Kafka node {node_id}"
        self.node_id = node_id
        self.dir = self.workdir = workdir / f"node{node_id}"
        self.log_path = self.dir / "server.log"
        self.plain_port = free_port()
        self.sasl_port = free_port()
        self.tls_port = free_port()
        self.controller_port = free_port()
        self.proc = None
        self.pid = 0

    @property
    def config_path(self) -> Path:
        return self.dir / "server.properties"


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID in unpadded base64url, as ``kafka-storage random-uuid``
    prints it. Like Kafka's own ``Uuid.randomUuid`` it never starts with "-": one id in 64 would,
    and a command line would read it as an option (a CI run failed on exactly that)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


class KafkaCluster:
    """``brokers`` KRaft nodes on loopback; :meth:`start` formats and starts them, :meth:`stop`
    stops them (the fixture does). Addresses: :attr:`bootstrap` (PLAINTEXT), :attr:`bootstrap_sasl`,
    :attr:`bootstrap_tls`; the CA of the TLS listener: :attr:`ca_file`."""

    def __init__(self, workdir: Path, brokers: int = 3, heap: str = HEAP) -> None:
        self.lib = build()
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.heap = heap
        self.nodes = [Node(i + 1, workdir) for i in range(brokers)]
        self.cluster_id = new_cluster_id()
        self.ca_file, self.keystore = make_tls(workdir / "tls")

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.plain_port}" for n in self.nodes)

    @property
    def bootstrap_sasl(self) -> str:
        return ",".join(f"127.0.0.1:{n.sasl_port}" for n in self.nodes)

    @property
    def bootstrap_tls(self) -> str:
        return ",".join(f"127.0.0.1:{n.tls_port}" for n in self.nodes)

    def _properties(self, node: Node) -> str:
        count = len(self.nodes)
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        return f"""\
process.roles=broker,controller
node.id={node.node_id}
controller.quorum.voters={voters}
controller.listener.names=CONTROLLER
listeners=PLAIN://127.0.0.1:{node.plain_port},SASL://127.0.0.1:{node.sasl_port},TLS://127.0.0.1:{node.tls_port},CONTROLLER://127.0.0.1:{node.controller_port}
advertised.listeners=PLAIN://127.0.0.1:{node.plain_port},SASL://127.0.0.1:{node.sasl_port},TLS://127.0.0.1:{node.tls_port}
listener.security.protocol.map=PLAIN:PLAINTEXT,SASL:SASL_PLAINTEXT,TLS:SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAIN
log.dirs={node.dir / "data"}
num.partitions=1
default.replication.factor={count}
min.insync.replicas={2 if count > 1 else 1}
offsets.topic.replication.factor={count}
offsets.topic.num.partitions=6
transaction.state.log.replication.factor={count}
transaction.state.log.min.isr={2 if count > 1 else 1}
share.coordinator.state.topic.replication.factor={count}
share.coordinator.state.topic.min.isr={2 if count > 1 else 1}
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=4
log.retention.hours=24
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512
listener.name.sasl.scram-sha-256.sasl.jaas.config={scram}
listener.name.sasl.scram-sha-512.sasl.jaas.config={scram}
ssl.keystore.type=PEM
ssl.keystore.location={self.keystore}
ssl.client.auth=none
"""

    def start(self) -> None:
        formats = []
        for node in self.nodes:
            node.dir.mkdir(parents=True, exist_ok=True)
            node.config_path.write_text(self._properties(node))
            formats.append(
                subprocess.Popen(
                    java_command(
                        self.lib,
                        STORAGE_TOOL,
                        "format",
                        f"--cluster-id={self.cluster_id}",
                        "-c",
                        str(node.config_path),
                        "--add-scram",
                        f"SCRAM-SHA-256=[name={SASL_USER},password={SASL_PASSWORD}]",
                        "--add-scram",
                        f"SCRAM-SHA-512=[name={SASL_USER},password={SASL_PASSWORD}]",
                        heap="128m",
                    ),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
        for node, proc in zip(self.nodes, formats, strict=True):
            out, _ = proc.communicate(timeout=scaled(120))
            if proc.returncode != 0:
                raise ServerUnavailable(f"formatting Kafka node {node.node_id} failed:\n{out.decode()[-2000:]}")
        for node in self.nodes:
            self.start_node(node, wait=False)
        self.wait_ready()

    def start_node(self, node: Node, wait: bool = True) -> None:
        node.pid = node.spawn(java_command(self.lib, MAIN_CLASS, str(node.config_path), heap=self.heap)).pid
        (node.dir / "pid").write_text(str(node.pid))
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Every running node is a registered broker and every port answers."""
        from confluent_kafka.admin import AdminClient

        timeout = scaled(timeout)  # 267 s for three nodes was seen at load 25
        deadline = time.monotonic() + timeout
        running = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        admin: AdminClient | None = None
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.proc is not None and node.proc.poll() is not None:
                    raise ServerUnavailable(f"{node.name} exited; last log lines:\n{node.log_tail(30)}")
            if all(port_open(n.plain_port) and port_open(n.sasl_port) and port_open(n.tls_port) for n in running):
                # made only now: a client made before the ports open logs every refused connect
                addresses = ",".join(f"127.0.0.1:{n.plain_port}" for n in running)
                admin = admin or AdminClient({"bootstrap.servers": addresses, "socket.timeout.ms": 5000})
                try:
                    brokers = admin.list_topics(timeout=5).brokers
                except Exception:  # KafkaException while the quorum forms
                    brokers = {}
                if {n.node_id for n in running} <= set(brokers):
                    return
            time.sleep(0.5)
        tails = "\n".join(f"node {n.node_id}:\n{n.log_tail(30)}" for n in self.nodes)
        raise ServerUnavailable(f"Kafka did not become ready in {timeout:.0f}s:\n{tails}")

    def stop_node(self, node: Node, kill: bool = False) -> None:
        """SIGTERM: a controlled shutdown (leadership moves first); ``kill``: SIGKILL."""
        node.stop_process(kill=kill)

    def rss_mb(self) -> list[float]:
        """Resident memory of each running node, MB (what the 3-node choice was measured by)."""
        sizes = []
        for node in self.nodes:
            try:
                status = Path(f"/proc/{node.pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"VmRSS:\s+(\d+) kB", status)
            if match:
                sizes.append(int(match.group(1)) / 1024)
        return sizes

    def create_topic(self, name: str, partitions: int = 1, config: dict[str, str] | None = None) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        replication = min(3, len(self.nodes))
        futures = admin.create_topics([NewTopic(name, partitions, replication, config=config or {})])
        futures[name].result(timeout=scaled(60))
        deadline = time.monotonic() + scaled(60)
        while time.monotonic() < deadline:  # metadata reaches every broker a moment later
            topic = admin.list_topics(name, timeout=10).topics.get(name)
            if (
                topic is not None
                and topic.error is None
                and len(topic.partitions) == partitions
                and all(p.leader >= 0 for p in topic.partitions.values())
            ):
                return
            time.sleep(0.2)
        raise ServerUnavailable(f"topic {name} has no leaders after {scaled(60):.0f} s")

    def env(self) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP": self.bootstrap,
            "KAFKA_BOOTSTRAP_SASL": self.bootstrap_sasl,
            "KAFKA_BOOTSTRAP_TLS": self.bootstrap_tls,
            "KAFKA_SASL_MECHANISMS": "SCRAM-SHA-512,SCRAM-SHA-256",
            "KAFKA_SASL_USERNAME": SASL_USER,
            "KAFKA_SASL_PASSWORD": SASL_PASSWORD,
            "KAFKA_CA_FILE": str(self.ca_file),
            "KAFKA_LIB": str(self.lib),
            "KAFKA_PIDS": ",".join(str(n.pid) for n in self.nodes),
        }

    def stop(self) -> None:
        for node in self.nodes:  # all at once: each one's shutdown then waits less on the others
            if node.proc is not None and node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGTERM)
        for node in self.nodes:
            self.stop_node(node)


def up(directory: Path, brokers: int = 3) -> KafkaCluster:
    """Start a cluster that outlives this process (``down`` stops it) and write ``DIR/env``."""
    cluster = KafkaCluster(directory, brokers)
    cluster.start()
    env = cluster.env()
    (directory / "env").write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    return cluster


def down(directory: Path) -> int:
    """Stop the nodes ``up`` started in ``directory`` (by the pids it wrote); how many were running."""
    stopped = 0
    for pid_file in sorted(directory.glob("node*/pid")):
        pid = int(pid_file.read_text())
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        stopped += 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.killpg(pid, signal.SIGKILL)
    return stopped
