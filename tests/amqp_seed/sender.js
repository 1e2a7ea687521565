const amqp = require('amqplib');
async function send() {
  const connection = await amqp.connect('amqp://localhost');
  const channel = await connection.createChannel();
  const queueName = 'hello';
  const message = 'Hello, RabbitMQ!';

  await channel.assertQueue(queueName); // ensures that the queue named queueName exists on the RabbitMQ server. If the queue does not exist, RabbitMQ will create it. 
  channel.sendToQueue(queueName, Buffer.from(message));
  console.log(`[x] Sent '${message}'`);

  setTimeout(() => {
    connection.close();
    process.exit(0);
  }, 500);
}
send().catch(console.error);
