// Command tcgcrypto times the cryptography a Kubernetes control plane does all day (TLS
// handshakes with client certificates, AES-GCM records, SHA-256), so that bench/tcg_cpu.py can
// run it natively and under QEMU's TCG with each guest CPU model and compare.
//
// Output: one line per operation, "name microseconds-per-op".
package main

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"os"
	"time"
)

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

// pair is a self-signed certificate usable as both server and client identity.
func pair(key any, pub any) tls.Certificate {
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "bench"},
		DNSNames: []string{"bench"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IsCA:        true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, key)
	must(err)
	cert, err := x509.ParseCertificate(der)
	must(err)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}
}

// handshake runs one mutual-TLS 1.3 handshake over an in-memory pipe.
func handshake(cert tls.Certificate) {
	pool := x509.NewCertPool()
	pool.AddCert(cert.Leaf)
	a, b := net.Pipe()
	done := make(chan error, 1)
	go func() {
		s := tls.Server(a, &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert,
			ClientCAs: pool, SessionTicketsDisabled: true})
		done <- s.Handshake()
	}()
	c := tls.Client(b, &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, ServerName: "bench"})
	must(c.Handshake())
	must(<-done)
	// The raw pipe, not tls.Conn.Close: nobody reads the close_notify on a synchronous pipe.
	a.Close()
	b.Close()
}

func timeIt(name string, minDur time.Duration, op func()) {
	op() // warm up
	n, start := 0, time.Now()
	for time.Since(start) < minDur {
		op()
		n++
	}
	fmt.Printf("%s %.1f\n", name, float64(time.Since(start).Microseconds())/float64(n))
}

func main() {
	minDur := 2 * time.Second
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	must(err)
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(err)
	rsaCert, ecCert := pair(rsaKey, &rsaKey.PublicKey), pair(ecKey, &ecKey.PublicKey)
	digest := sha256.Sum256([]byte("bench"))
	block, err := aes.NewCipher(make([]byte, 16))
	must(err)
	gcm, err := cipher.NewGCM(block)
	must(err)
	record, nonce := make([]byte, 16384), make([]byte, 12)

	timeIt("tls13-mutual-handshake-rsa2048", minDur, func() { handshake(rsaCert) })
	timeIt("tls13-mutual-handshake-ecdsa-p256", minDur, func() { handshake(ecCert) })
	timeIt("rsa2048-sign", minDur, func() { _, err := rsa.SignPKCS1v15(rand.Reader, rsaKey, 5, digest[:]); must(err) })
	timeIt("ecdsa-p256-sign", minDur, func() { _, err := ecdsa.SignASN1(rand.Reader, ecKey, digest[:]); must(err) })
	timeIt("aes128gcm-seal-16KiB", minDur, func() { gcm.Seal(nil, nonce, record, nil) })
	timeIt("sha256-16KiB", minDur, func() { sha256.Sum256(record) })
}
