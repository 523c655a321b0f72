// GELF receiver for the gelf output tests. UDP: graygelf's server (npm), an independent
// implementation that reassembles chunks and inflates gzip/zlib. TCP/TLS: GELF's TCP framing
// (JSON documents ended by a NUL byte) read with Node's net/tls. Every message is printed to
// stdout as one JSON line {"transport": ..., "message": ...}; "ready" lines give the ports.
'use strict'
const fs = require('fs')
const net = require('net')
const tls = require('tls')
const GrayGelfServer = require('graygelf/server')

const [udpPort, tcpPort, tlsPort, certFile, keyFile] = process.argv.slice(2)
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

const udp = new GrayGelfServer()
udp.on('message', (message) => out({ transport: 'udp', message }))
udp.on('error', (err) => out({ transport: 'udp', error: String(err) }))
udp.listen(Number(udpPort), '127.0.0.1')

function framed (transport) {
  return (socket) => {
    let pending = Buffer.alloc(0)
    socket.on('data', (data) => {
      pending = Buffer.concat([pending, data])
      let end
      while ((end = pending.indexOf(0)) >= 0) {
        const doc = pending.subarray(0, end).toString('utf8')
        pending = pending.subarray(end + 1)
        try {
          out({ transport, message: JSON.parse(doc) })
        } catch (err) {
          out({ transport, error: String(err), raw: doc.slice(0, 200) })
        }
      }
    })
    socket.on('error', () => {})
  }
}

net.createServer(framed('tcp')).listen(Number(tcpPort), '127.0.0.1')
if (certFile) {
  tls.createServer({ cert: fs.readFileSync(certFile), key: fs.readFileSync(keyFile) }, framed('tls'))
    .listen(Number(tlsPort), '127.0.0.1')
}
setTimeout(() => out({ ready: true }), 200)
